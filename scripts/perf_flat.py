#!/usr/bin/env python3
"""Flat and inclusive profile of one `perf record -g` capture of a mendkv node, with the
binary's symbols resolved by addr2line (Debian's perf does not read the DWARF of current
Rust release builds, so its own report shows bare addresses).
    perf record -F 499 -g -p PID -o put.data -- sleep 12
    scripts/perf_flat.py put.data path/to/mendkv [top]
Prints the top functions by self samples (kernel and libc by perf's names, the binary's
innermost inlined function by addr2line) and the share of samples whose stack holds each
of a few crates (inclusive)."""
import collections, re, subprocess, sys

data, binary = sys.argv[1], sys.argv[2]
top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
name = binary.rsplit("/", 1)[-1]
mmaps = subprocess.run(["perf", "script", "-i", data, "--show-mmap-events"],
                       capture_output=True, text=True).stdout
base = None
for line in mmaps.splitlines():
    m = re.search(r"MMAP2? .*\[0x([0-9a-f]+)\(0x[0-9a-f]+\) @ 0x([0-9a-f]+) .*r-xp .*" + re.escape(name), line)
    if m:
        base = (int(m.group(1), 16), int(m.group(2), 16))
        break
# File offset to virtual address: the executable segment's p_vaddr - p_offset.
segments = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True).stdout
shift = 0
for line in segments.splitlines():
    f = line.split()
    if f and f[0] == "LOAD" and "E" in f[6:-1]:
        shift = int(f[2], 16) - int(f[1], 16)
script = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"],
                        capture_output=True, text=True).stdout
samples, current = [], []
for line in script.splitlines():
    line = line.strip()
    if not line:
        if current:
            samples.append(current)
        current = []
        continue
    parts = line.split(None, 1)
    ip = int(parts[0], 16)
    rest = parts[1] if len(parts) > 1 else ""
    current.append((ip, rest))
if current:
    samples.append(current)
addresses = sorted({ip for s in samples for ip, rest in s if name in rest})
resolved = {}
def file_offset(ip):
    # perf script prints the binary's frames as file offsets already, mapped ones as is.
    return ip - base[0] + base[1] if base and ip >= base[0] else ip
if addresses:
    text = "\n".join(hex(file_offset(ip) + shift) for ip in addresses)
    out = subprocess.run(["addr2line", "-f", "-C", "-e", binary], input=text,
                         capture_output=True, text=True).stdout.splitlines()
    for ip, i in zip(addresses, range(0, len(out), 2)):
        resolved[ip] = out[i][:110]
def frame(ip, rest):
    if ip in resolved:
        return resolved[ip]
    return rest.rsplit(" (", 1)[0] or rest
flat = collections.Counter(frame(*s[0]) for s in samples if s)
crates = ["mendkv_server", "mendkv_core", "mendkv_storage", "fjall", "lsm_tree", "hyper", "axum",
          "tokio", "postcard", "crossbeam", "prometheus", "malloc", "free", "futex", "tcp_", "ext4",
          "fdatasync", "finish_task_switch", "schedule", "epoll"]
inclusive = collections.Counter()
for s in samples:
    names = " ".join(frame(ip, rest) for ip, rest in s)
    for c in crates:
        if c in names:
            inclusive[c] += 1
total = len(samples)
print(f"{total} samples")
print("self:")
for f, n in flat.most_common(top):
    print(f"  {100 * n / total:5.1f}%  {f}")
print("inclusive (stack holds):")
for c, n in inclusive.most_common():
    print(f"  {100 * n / total:5.1f}%  {c}")
