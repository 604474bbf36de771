#!/usr/bin/env bash
# Starts a local 3-node cluster (release build) in a temporary directory, runs `mendkv bench`
# against all three nodes with the given bench arguments, prints the result and the network
# bytes from /metrics, and stops the cluster. Environment variables (MENDKV_...) pass through
# to the nodes, e.g. MENDKV_STORAGE__FSYNC=periodic.
#   scripts/bench_cluster.sh --workload w --ops 50000 --concurrency 64 --value-size 100
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p mendkv >/dev/null 2>&1
source scripts/lib_bench.sh
bin=$(bench_mendkv_bin)
dir=$(mktemp -d)
port=${BENCH_BASE_PORT:-28001}
trap 'bench_stop_cluster; rm -rf "$dir"' EXIT
bench_start_cluster "$dir" "$port"
mapfile -t nodes < <(bench_node_args "$port")
"$bin" bench "${nodes[@]}" "$@"
for i in 0 1 2; do curl -s "http://127.0.0.1:$((port + i))/metrics"; done |
  awk '/^mendkv_network_bytes_total/ { split($1, a, "class=\""); split(a[2], c, "\""); split($1, d, "direction=\""); split(d[2], e, "\""); sum[e[1] " " c[1]] += $2 }
       END { for (k in sum) printf "bytes %s %d\n", k, sum[k] }' | sort
