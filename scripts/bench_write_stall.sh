#!/usr/bin/env bash
# Write stalls at fjall's journal rotation (issue 14): a 3-node `mendkv cluster` (release
# build, RESP, fsync = always) takes `redis-benchmark -t set -n N -d 100 -r 100000 -c 50`
# while a probe (scripts/write_stall_probe.py) sends one SET every 20 ms to node 1 and notes
# when the first fjall journal rotates; it prints the probe's p50/p99/max latency before and
# after that point, and whether redis-benchmark finished without an error (it stops at the
# first error reply, e.g. a TIMEOUT after the 2 s request deadline). Each binary gets a fresh
# cluster; binaries alternate ROUNDS times, in one run.
#   scripts/bench_write_stall.sh N ROUNDS BINARY...
#   e.g. scripts/bench_write_stall.sh 500000 1 /tmp/mendkv-main target/release/mendkv
# BENCH_STALL_HOOK="command" is run once by the probe while one of its SETs has waited
# 1.2 s (e.g. gdb stack dumps of the nodes, to see where a stall waits).
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:?number of SETs}
rounds=${2:?rounds}
shift 2
binaries=("$@")
[ ${#binaries[@]} -gt 0 ] || {
  echo "name at least one binary" >&2
  exit 2
}
port=${BENCH_MENDKV_BASE_PORT:-29101}
resp=$((port + 1000))
dir=$(mktemp -d)
cluster=
probe=
stop() {
  [ -z "$probe" ] || kill -TERM "$probe" 2>/dev/null || true
  [ -z "$cluster" ] || kill -INT "$cluster" 2>/dev/null || true
  wait 2>/dev/null || true
  cluster= probe=
}
trap 'stop; rm -rf "$dir"' EXIT

up() {
  for i in 0 1 2; do
    [ "$(curl -s "http://127.0.0.1:$((port + i))/cluster/status" | grep -o '"status":"up"' | wc -l)" -eq 3 ] || return 1
    redis-cli -p $((resp + i)) ping 2>/dev/null | grep -q PONG || return 1
  done
}

echo "redis-benchmark -t set -n $requests -d 100 -r 100000 -c 50; $(nproc) cores, $(date -u +%FT%TZ)"
for round in $(seq 1 "$rounds"); do
  for bin in "${binaries[@]}"; do
    data="$dir/run"
    rm -rf "$data"
    mkdir -p "$data"
    RUST_LOG=warn "$bin" cluster --nodes 3 --data-dir "$data" --base-port "$port" >"$dir/cluster.out" 2>&1 &
    cluster=$!
    for _ in $(seq 1 600); do up && break; sleep 0.1; done
    up || {
      echo "cluster not up"
      cat "$dir/cluster.out"
      exit 1
    }
    python3 scripts/write_stall_probe.py --port "$resp" \
      --db-dir "$data/node1/db" --db-dir "$data/node2/db" --db-dir "$data/node3/db" \
      ${BENCH_STALL_HOOK:+--on-stall "$BENCH_STALL_HOOK"} >"$dir/probe.out" 2>&1 &
    probe=$!
    load="load $(cut -d' ' -f1-3 /proc/loadavg)"
    if out=$(redis-benchmark -h 127.0.0.1 -p "$resp" -t set -n "$requests" -d 100 -r 100000 -c 50 --csv 2>&1); then
      result=$(echo "$out" | grep '^"SET"' | awk -F, '{ gsub(/"/, ""); printf "%s SET/s, p50 %s ms, p99 %s ms, max %s ms", $2, $5, $7, $8 }')
    else
      result="FAILED: $(echo "$out" | grep -v '^"' | tr '\r' '\n' | grep -v '^ *$' | tail -n 2 | tr '\n' ' ')"
    fi
    kill -TERM "$probe"
    wait "$probe" || true
    probe=
    echo "round $round $bin ($load): redis-benchmark $result"
    sed 's/^/  /' "$dir/probe.out"
    echo "  journals: $(ls "$data"/node1/db/*.jnl 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"
    grep -h 'WARN\|ERROR' "$data"/node*/server.log 2>/dev/null | grep -v 'no epoch record' | tail -n 3 | sed 's/^/  log: /' || true
    kill -INT "$cluster" 2>/dev/null || true
    wait "$cluster" 2>/dev/null || true
    cluster=
  done
done
