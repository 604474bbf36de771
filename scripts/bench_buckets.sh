#!/usr/bin/env bash
# Blind PUTs (no context) on an lww bucket, then on a causal bucket, in three rounds each on
# one local 3-node release cluster (rounds on the same cluster, so a causal bucket's siblings
# accumulate from round to round as they do under real blind writers).
#   scripts/bench_buckets.sh [ops per round] [concurrency]
# BUCKET_ORDER="blind_causal blind_lww" runs the causal rounds first (to tell the cluster's
# growth apart from the resolution); "rmw_causal" adds read-modify-write clients on a causal
# bucket (`mendkv bench --workload rmw`: read at quorum, write back with the context).
set -euo pipefail
cd "$(dirname "$0")/.."
ops=${1:-50000}
concurrency=${2:-32}
source scripts/lib_bench.sh
bin=$(bench_mendkv_bin)
dir=$(mktemp -d)
port=${BENCH_BASE_PORT:-28101}
trap 'bench_stop_cluster; rm -rf "$dir"' EXIT
bench_start_cluster "$dir" "$port"
mapfile -t nodes < <(bench_node_args "$port")
# Every node must hold the change before the first round (gossip, about a second).
bench_set_lww blind_lww "$port"
for bucket in ${BUCKET_ORDER:-blind_lww blind_causal}; do
  for round in 1 2 3; do
    echo "== $bucket round $round"
    workload=w
    [[ $bucket == rmw_* ]] && workload=rmw
    "$bin" bench "${nodes[@]}" --workload "$workload" --ops "$ops" --concurrency "$concurrency" \
      --keys 100000 --value-size 100 --bucket "$bucket" --seed "$round"
  done
done
