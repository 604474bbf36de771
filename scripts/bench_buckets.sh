#!/usr/bin/env bash
# Blind PUTs (no context) on an lww bucket, then on a causal bucket, in three rounds each on
# one local 3-node release cluster (rounds on the same cluster, so a causal bucket's siblings
# accumulate from round to round as they do under real blind writers).
#   scripts/bench_buckets.sh [ops per round] [concurrency]
# BUCKET_ORDER="blind_causal blind_lww" runs the causal rounds first (to tell the cluster's
# growth apart from the resolution).
set -euo pipefail
cd "$(dirname "$0")/.."
ops=${1:-50000}
concurrency=${2:-32}
bin=${MENDKV_BIN:-${CARGO_TARGET_DIR:-target}/release/mendkv}
dir=$(mktemp -d)
port=${BENCH_BASE_PORT:-28101}
"$bin" cluster --data-dir "$dir" --base-port "$port" >"$dir/cluster.out" 2>&1 &
cluster=$!
trap 'kill -INT $cluster 2>/dev/null; wait $cluster 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 300); do
  grep -q "cluster ready" "$dir/cluster.out" 2>/dev/null && break
  sleep 0.1
done
grep -q "cluster ready" "$dir/cluster.out" || { cat "$dir/cluster.out"; exit 1; }
first="http://127.0.0.1:$port"
nodes=(--node "$first" --node "http://127.0.0.1:$((port + 1))" --node "http://127.0.0.1:$((port + 2))")
"$bin" bucket set blind_lww --resolution lww --node "$first"
# Every node must hold the change before the first round (gossip, about a second).
for i in 0 1 2; do
  until "$bin" bucket get blind_lww --node "http://127.0.0.1:$((port + i))" | grep -q '"lww"'; do sleep 0.1; done
done
for bucket in ${BUCKET_ORDER:-blind_lww blind_causal}; do
  for round in 1 2 3; do
    echo "== $bucket round $round"
    "$bin" bench "${nodes[@]}" --workload w --ops "$ops" --concurrency "$concurrency" \
      --keys 100000 --value-size 100 --bucket "$bucket" --seed "$round"
  done
done
