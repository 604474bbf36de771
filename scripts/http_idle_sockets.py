"""Starts one mendkv node, holds N idle client sockets to its HTTP port, and reports the
node's VmRSS and open descriptors before, during and after, how many of the sockets the node
answered or closed, and whether /health answers meanwhile.
Usage: python3 idle_sockets.py BINARY [N]"""
import os, resource, socket, subprocess, sys, tempfile, time

binary = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
# The hard open-file limit cannot be raised in this sandbox, so the sockets are held by
# holder processes of at most 10,000 sockets each.
HOLDER = r"""
import select, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sockets, failed = [], 0
for i in range(n):
    s = socket.socket(); s.settimeout(2.0)
    try:
        s.connect(("127.0.0.1", port)); sockets.append(s)
    except Exception:
        failed += 1; s.close()
print(f"opened {len(sockets)} failed {failed}", flush=True)
sys.stdin.readline()
poller = select.poll()
for s in sockets:
    poller.register(s, select.POLLIN)
closed = len(poller.poll(0))
print(f"closed {closed}", flush=True)
sys.stdin.readline()
"""

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))

def health(port, timeout=5.0):
    started = time.time()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.settimeout(timeout)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        status = data.split(b"\r\n")[0].decode()
        return f"{status!r} in {time.time() - started:.3f}s"
    except Exception as e:
        return f"no answer ({e!r}) after {time.time() - started:.1f}s"

data_dir = tempfile.mkdtemp()
http_port, peer_port = free_port(), free_port()
env = dict(os.environ, RUST_LOG="warn", MENDKV_CLUSTER__REPLICATION_FACTOR="1")
node = subprocess.Popen(
    [binary, "server", "--node-id", "n1", "--listen", f"127.0.0.1:{peer_port}",
     "--http", f"127.0.0.1:{http_port}", "--data-dir", data_dir],
    env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(data_dir, "log"), "w"))
deadline = time.time() + 30
while "200" not in health(http_port, 1.0):
    assert time.time() < deadline, "node did not start"
    time.sleep(0.1)
limits = [l for l in open(f"/proc/{node.pid}/limits") if l.startswith("Max open files")][0]
print("node:", " ".join(limits.split()))
print(f"baseline: VmRSS {rss_kib(node.pid)} KiB, {open_fds(node.pid)} fds, /health {health(http_port)}")
started = time.time()
holders = []
left = count
while left > 0:
    n = min(10000, left)
    left -= n
    holders.append(subprocess.Popen([sys.executable, "-c", HOLDER, str(http_port), str(n)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
opened = [h.stdout.readline().strip() for h in holders]
print(f"holders: {opened} in {time.time() - started:.1f}s")
time.sleep(3)  # lets the node settle before measuring; not test synchronisation
for h in holders:
    h.stdin.write("\n"); h.stdin.flush()
closed = [h.stdout.readline().strip() for h in holders]
print(f"with {count} sockets: VmRSS {rss_kib(node.pid)} KiB, node holds {open_fds(node.pid)} fds; "
      f"answered/closed by the node: {closed}")
print(f"/health with the sockets open: {health(http_port)}")
for h in holders:
    h.stdin.write("\n"); h.stdin.flush(); h.wait()
time.sleep(2)
print(f"after closing them: VmRSS {rss_kib(node.pid)} KiB, {open_fds(node.pid)} fds, /health {health(http_port)}")
node.terminate(); node.wait(timeout=30)
log = open(os.path.join(data_dir, "log")).read()
print(f"log: {len(log.splitlines())} lines, {log.count('ccept')} mention accept")
for line in log.strip().splitlines()[-2:]:
    print("  ", line[:250])
