#!/usr/bin/env bash
# Restart time against stored data: one node (`mendkv server`, release build) is loaded with
# KEYS keys of 100 bytes (`mendkv bench --preload`, fsync periodic to load faster), stopped
# cleanly, then restarted over the same data by each binary in turn, alternating, ROUNDS
# times: the time from spawn to the first answered GET, the time until every Merkle tree is
# built (the tree_rebuilds counter reaches the number of ranges), and RSS.
#   scripts/bench_restart.sh KEYS [ROUNDS] [BINARY...]      (default binary: this tree's)
#   e.g. scripts/bench_restart.sh 2000000 2 /tmp/mendkv-main target/release/mendkv
# BENCH_RESTART_DATA=DIR keeps the loaded data set: loaded into DIR once (by the first
# binary), then copied from DIR by later runs, which skip the load.
# Each timed start follows a stop by the same binary (what a start finds on disk depends on
# how the binary wrote and stopped): before it the binary under test is started over the
# data, takes BENCH_RESTART_WRITES more writes (default 0; `bench --preload` of that many
# keys, overwrites, fsync periodic) and is stopped, cleanly (SIGINT) or, with
# BENCH_RESTART_KILL=1, with SIGKILL (the kill -9 case: the start replays whatever journal
# that binary left behind).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib_bench.sh
keys=${1:?number of keys}
rounds=${2:-2}
shift $(($# >= 2 ? 2 : 1))
binaries=("$@")
if [ ${#binaries[@]} -eq 0 ]; then
  [ -n "${MENDKV_BIN:-}" ] || cargo build --release --locked -p mendkv >/dev/null 2>&1
  binaries=("$(bench_mendkv_bin)")
fi
port=${BENCH_BASE_PORT:-28501}
dir=$(mktemp -d)
node=
# The nodes' stderr (RUST_LOG from the environment); BENCH_RESTART_LOG=FILE keeps it.
log=${BENCH_RESTART_LOG:-$dir/server.log}
trap 'bench_stop_node; rm -rf "$dir"' EXIT
start_node() {
  "$1" server --node-id node1 --listen "127.0.0.1:$((port - 1000))" --http "127.0.0.1:$port" \
    --resp "127.0.0.1:$((port + 1000))" --data-dir "$dir/node1" 2>>"$log" &
  node=$!
}
wait_serving() {
  until curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/kv/bench/key0" 2>/dev/null | grep -qE '200|300'; do
    sleep 0.01
  done
}
rebuilds() {
  curl -s "http://127.0.0.1:$port/metrics" | awk '/^mendkv_anti_entropy_tree_rebuilds/ { print $2 }'
}

# A long request deadline while loading: on a busy machine a write can wait past the default.
load() { # $1 = binary, $2 = keys
  MENDKV_STORAGE__FSYNC=periodic MENDKV_CONSISTENCY__REQUEST_TIMEOUT_MS=30000 start_node "$1"
  bench_wait_http "http://127.0.0.1:$port/health" 120
  started=$(date +%s.%N)
  "$1" bench --node "http://127.0.0.1:$port" --workload c --ops 1 --keys "$2" \
    --preload --concurrency 16 --value-size 100 | grep preloaded
  echo "RSS after loading $2 keys: $(bench_rss_kib "$node") KiB ($(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.0f", e - s }') s)"
}
saved=${BENCH_RESTART_DATA:-}
if [ -n "$saved" ] && [ -d "$saved/node1" ]; then
  cp -a "$saved/node1" "$dir/node1"
  echo "data set copied from $saved"
else
  load "${binaries[0]}" "$keys"
  bench_stop_node
  if [ -n "$saved" ]; then
    mkdir -p "$saved"
    cp -a "$dir/node1" "$saved/node1"
  fi
fi
echo "data: $(du -sh "$dir/node1" | cut -f1)"
ranges=0
for round in $(seq 1 "$rounds"); do
  for bin in "${binaries[@]}"; do
    writes=${BENCH_RESTART_WRITES:-0}
    if [ "$writes" -gt 0 ]; then
      load "$bin" "$writes"
    else
      start_node "$bin"
      wait_serving
    fi
    if [ -n "${BENCH_RESTART_KILL:-}" ]; then
      kill -KILL "$node"
      wait "$node" 2>/dev/null || true
      node=
    else
      bench_stop_node
    fi
    echo "$bin stopped ($([ -n "${BENCH_RESTART_KILL:-}" ] && echo SIGKILL || echo SIGINT)): journals $(du -ck "$dir"/node1/db/*.jnl | tail -n1 | cut -f1) KiB on disk in $(ls "$dir"/node1/db/*.jnl | wc -l) files"
    t0=$(date +%s%N)
    start_node "$bin"
    wait_serving
    t1=$(date +%s%N)
    serving_rss=$(bench_rss_kib "$node")
    # The first binary's count after a start is the number of ranges, unless it is still
    # building: wait until the counter stops growing.
    last=-1
    while :; do
      now=$(rebuilds)
      now=${now:-0}
      if [ "$now" = "$last" ] && [ "$now" -gt 0 ] && [ "$now" -ge "$ranges" ]; then break; fi
      last=$now
      sleep 0.5
    done
    [ "$ranges" -gt 0 ] || ranges=$now
    t2=$(date +%s%N)
    printf 'round %s %s (load %s): serving after %d ms, trees built after about %d ms (%s trees), RSS serving %s KiB, after builds %s KiB\n' \
      "$round" "$bin" "$(cut -d' ' -f1 /proc/loadavg)" $(((t1 - t0) / 1000000)) $(((t2 - t0) / 1000000 - 500)) "$now" "$serving_rss" "$(bench_rss_kib "$node")"
    bench_stop_node
  done
done
