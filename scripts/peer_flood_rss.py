#!/usr/bin/env python3
"""RSS of one node while unauthenticated peer connections each send (most of) an 8 MiB frame.

Starts `mendkv server` on free loopback ports, opens CONNECTIONS peer connections that send a
length prefix of 8 MiB - 1 and then FRAME_BODY_BYTES of that frame without ever finishing the
handshake, and reports the node's VmRSS before and at the peak (VmHWM) while the connections
are open.

    python3 scripts/peer_flood_rss.py [path/to/mendkv] [connections] [frame length]

The frame length defaults to 8 MiB - 1 (over the handshake frame limit, refused at its
length prefix by a fixed node); 4000 is under it and shows the cap on pending handshakes.
"""

import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/mendkv"
CONNECTIONS = int(sys.argv[2]) if len(sys.argv) > 2 else 100
FRAME_LENGTH = int(sys.argv[3]) if len(sys.argv) > 3 else (8 << 20) - 1
FRAME_BODY_BYTES = FRAME_LENGTH - 1  # everything but the last byte: the frame stays pending
CHUNK = b"\0" * (256 << 10)
SENT_LOCK = threading.Lock()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1))


def wait_healthy(url, deadline_s=30):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("node did not become healthy")


def flood(port, sent, errors):
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(struct.pack(">I", FRAME_LENGTH))
        remaining = FRAME_BODY_BYTES
        while remaining > 0:
            n = sock.send(CHUNK[: min(len(CHUNK), remaining)])
            remaining -= n
            with SENT_LOCK:
                sent[0] += n
        return sock
    except OSError as error:
        # A node that caps pending handshakes closes excess connections at once.
        errors.append(error)
        return None


def main():
    peer_port, http_port = free_port(), free_port()
    data_dir = tempfile.mkdtemp(prefix="mendkv-flood-")
    log = open(os.path.join(data_dir, "server.log"), "w")
    node = subprocess.Popen(
        [BINARY, "server", "--node-id", "flood", "--listen", f"127.0.0.1:{peer_port}",
         "--http", f"127.0.0.1:{http_port}", "--data-dir", data_dir],
        stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
    try:
        wait_healthy(f"http://127.0.0.1:{http_port}")
        idle = status_kib(node.pid, "VmRSS")
        sent, errors, sockets = [0], [], []
        threads = []
        start = time.monotonic()

        def run():
            sock = flood(peer_port, sent, errors)
            if sock is not None:
                sockets.append(sock)

        for _ in range(CONNECTIONS):
            thread = threading.Thread(target=run)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(timeout=10)
        elapsed = time.monotonic() - start
        during = status_kib(node.pid, "VmRSS")
        peak = status_kib(node.pid, "VmHWM")
        print(f"binary: {BINARY}")
        print(f"connections: {CONNECTIONS}, frame prefix {FRAME_LENGTH} bytes, "
              f"body bytes accepted by the node's socket: {sent[0] / (1 << 20):.0f} MiB "
              f"in {elapsed:.2f} s, connection errors: {len(errors)}")
        print(f"VmRSS idle: {idle / 1024:.1f} MiB, after flood: {during / 1024:.1f} MiB, "
              f"peak VmHWM: {peak / 1024:.1f} MiB")
        still_open = 0
        for sock in sockets:
            sock.setblocking(False)
            try:
                still_open += sock.recv(1) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
        print(f"connections the node still holds open: {still_open}")
        for sock in sockets:
            sock.close()
    finally:
        node.terminate()
        node.wait(timeout=10)
        log.close()


if __name__ == "__main__":
    main()
