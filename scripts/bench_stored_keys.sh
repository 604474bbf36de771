#!/usr/bin/env bash
# PUT and GET throughput of one node with a large data set stored vs a small one (issue 15:
# "with 2,000,000 keys stored, >= 80% of an empty store's"). One `mendkv server` (release
# build, fsync = always, RF 3 on one node: it holds every key), driven by `mendkv bench`
# over HTTP, alternating ROUNDS times:
# - small: a fresh node with SMALL keys written first (`bench --preload`), then PUTs and
#   GETs over those keys;
# - stored: a node started over a copy of DATA (a data directory holding KEYS keys, e.g.
#   the one bench_restart.sh keeps with BENCH_RESTART_DATA), then PUTs and GETs uniform
#   over all KEYS keys (so reads touch the whole data set, not a cached corner of it).
#   scripts/bench_stored_keys.sh DATA KEYS [ROUNDS] [BINARY]
#   e.g. BENCH_RESTART_DATA=/tmp/d2m scripts/bench_restart.sh 2000000 1 &&
#        scripts/bench_stored_keys.sh /tmp/d2m 2000000 2
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib_bench.sh
data=${1:?data directory holding node1/}
keys=${2:?number of keys stored in it}
rounds=${3:-2}
bin=${4:-$(bench_mendkv_bin)}
small=${BENCH_SMALL_KEYS:-100000}
ops=${BENCH_OPS:-40000}
concurrency=${BENCH_CONCURRENCY:-32}
port=${BENCH_BASE_PORT:-28601}
dir=$(mktemp -d)
node=
trap 'bench_stop_node; rm -rf "$dir"' EXIT
start_node() {
  "$bin" server --node-id node1 --listen "127.0.0.1:$((port - 1000))" --http "127.0.0.1:$port" \
    --data-dir "$dir/node1" 2>>"$dir/server.log" &
  node=$!
  bench_wait_http "http://127.0.0.1:$port/health" 120
}
measure() { # $1 = case, $2 = workload, $3 = keys
  local out
  out=$("$bin" bench --node "http://127.0.0.1:$port" --workload "$2" --ops "$ops" --keys "$3" \
    --concurrency "$concurrency" --value-size 100 --seed 7 2>&1) || true
  echo "  $1 workload $2 over $3 keys (load $(cut -d' ' -f1 /proc/loadavg)): $(echo "$out" | grep -i 'ops/s' | head -n 1)"
  echo "$out" | grep -E 'p99|failed' | sed 's/^/    /'
}

echo "bench_stored_keys: $keys stored vs $small, $ops ops per case, concurrency $concurrency, $(nproc) cores, $(date -u +%FT%TZ), $bin"
for round in $(seq 1 "$rounds"); do
  rm -rf "$dir/node1"
  start_node
  "$bin" bench --node "http://127.0.0.1:$port" --workload c --ops 1 --keys "$small" --preload \
    --concurrency "$concurrency" --value-size 100 | grep preloaded | sed 's/^/  small: /'
  echo "round $round small ($small keys), RSS $(bench_rss_kib "$node")KiB"
  measure small w "$small"
  measure small c "$small"
  bench_stop_node

  rm -rf "$dir/node1"
  cp -a "$data/node1" "$dir/node1"
  start_node
  # The Merkle trees build in the background after a start (a scan of every key): measure
  # after they are built, as in a node that has been up a while.
  last=-1
  for _ in $(seq 1 600); do
    now=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^mendkv_anti_entropy_tree_rebuilds/ { print $2 }')
    now=${now:-0}
    if [ "$now" = "$last" ] && [ "$now" -gt 0 ]; then break; fi
    last=$now
    sleep 1
  done
  echo "round $round stored ($keys keys), trees built ($now), RSS $(bench_rss_kib "$node")KiB"
  measure stored w "$keys"
  measure stored c "$keys"
  echo "  RSS after: $(bench_rss_kib "$node")KiB"
  bench_stop_node
done
