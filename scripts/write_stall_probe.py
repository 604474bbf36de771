#!/usr/bin/env python3
"""Latency probe for a write stall: one RESP connection sends a SET every INTERVAL seconds
(while a load generator runs next to it) and records each SET's latency; meanwhile it
watches the nodes' fjall journal directories and notes when the first journal rotation
happens (a second `*.jnl` file appears). On SIGTERM/SIGINT (or after --duration) it prints
p50/p99/max latency of the probe SETs before and after that rotation point.

    write_stall_probe.py --port 29101 --db-dir DIR/node1/db [--db-dir ...] [--interval 0.02]

A SET that waits longer than --timeout seconds counts as a timeout (its latency is the
timeout) and the probe reconnects. No dependencies beyond the standard library.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(round(p / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[index]


def resp_set(key, value):
    parts = [b"SET", key, value]
    out = b"*%d\r\n" % len(parts)
    for part in parts:
        out += b"$%d\r\n%s\r\n" % (len(part), part)
    return out


def journal_count(db_dirs):
    count = 0
    for d in db_dirs:
        try:
            count = max(count, sum(1 for name in os.listdir(d) if name.endswith(".jnl")))
        except FileNotFoundError:
            pass
    return count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db-dir", action="append", default=[])
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument(
        "--on-stall",
        help="shell command run once, while a SET has been waiting --stall-ms (e.g. a stack dump)",
    )
    parser.add_argument("--stall-ms", type=float, default=1200.0)
    args = parser.parse_args()

    stop = [False]

    def on_signal(_signum, _frame):
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    samples = []  # (start time, latency s, ok)
    rotation_at = None
    first_journals = None
    conn = None
    started = time.monotonic()
    value = b"p" * 100
    n = 0
    while not stop[0] and time.monotonic() - started < args.duration:
        journals = journal_count(args.db_dir)
        if first_journals is None:
            first_journals = journals
        if rotation_at is None and journals > first_journals:
            rotation_at = time.monotonic()
        if conn is None:
            try:
                conn = socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                conn = None
                time.sleep(args.interval)
                continue
        key = b"probe:%d" % (n % 1000)
        n += 1
        t0 = time.monotonic()
        ok = True
        hook = None
        if args.on_stall:
            command = args.on_stall

            def fire():
                args.on_stall = None  # once
                subprocess.call(command, shell=True)

            hook = threading.Timer(args.stall_ms / 1000.0, fire)
            hook.start()
        try:
            conn.sendall(resp_set(key, value))
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    raise OSError("closed")
                reply += chunk
            ok = reply.startswith(b"+OK")
            latency = time.monotonic() - t0
        except OSError:
            ok = False
            latency = time.monotonic() - t0
            try:
                conn.close()
            except OSError:
                pass
            conn = None
        if hook is not None:
            hook.cancel()
        samples.append((t0, latency, ok))
        rest = args.interval - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)

    def summary(name, chosen):
        lat = sorted(s[1] * 1000 for s in chosen)
        errors = sum(1 for s in chosen if not s[2])
        return "%s: %d SETs, %d errors, p50 %.1f ms, p99 %.1f ms, max %.1f ms" % (
            name,
            len(lat),
            errors,
            percentile(lat, 50),
            percentile(lat, 99),
            lat[-1] if lat else float("nan"),
        )

    if rotation_at is None:
        print("probe: no journal rotation seen; " + summary("all", samples))
    else:
        print("probe: first journal rotation seen %.1f s after the probe started" % (rotation_at - started))
        print("probe " + summary("before rotation", [s for s in samples if s[0] < rotation_at]))
        print("probe " + summary("after rotation", [s for s in samples if s[0] >= rotation_at]))
    worst = sorted(samples, key=lambda s: -s[1])[:3]
    print("probe worst: " + ", ".join("%.0f ms at +%.1f s" % (s[1] * 1000, s[0] - started) for s in worst))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
