#!/usr/bin/env bash
# Join benchmark (issue 13): a 3-node release cluster holds KEYS keys of 100 B; a 4th node
# starts with a seed and joins (streams the ranges it gains from their replicas). Under a
# steady open-loop foreground load (`mendkv bench --rate`, workload a: 50% reads at r=quorum,
# 50% writes at w=quorum, on other keys) at half the cluster's measured capacity, it reports:
#   time from the 4th node's start to `normal` on every node,
#   keys and bytes it streamed in (mendkv_streaming_keys_total / _bytes_total{direction="in"})
#   and their rate over that time,
#   foreground ops/s, p50, p99 before the join (same cluster, same load) and during it.
# Modes, each on a fresh cluster:
#   default      the shipped configuration (repair controller on, its byte budget)
#   unthrottled  repair controller off and no anti-entropy rate limit
#   scripts/bench_join.sh [KEYS=1000000] [FOREGROUND_OPS_PER_S=auto; 0: no foreground load,
#   the streaming rate alone]
# MODES (default "default unthrottled"), BASELINE_S (20), BENCH_BASE_PORT (29701),
# SETTLE_S (30: idle time after the preload, so its flushes and compactions do not land in the
# "before" window).
# A benchmark, not a test: CI never runs it. The numbers depend on the machine's load.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib_bench.sh
keys=${1:-1000000}
rate=${2:-auto}
modes=${MODES:-default unthrottled}
baseline_s=${BASELINE_S:-20}
settle_s=${SETTLE_S:-30}
foreground_keys=20000
[ -n "${MENDKV_BIN:-}" ] || cargo build --release --locked -p mendkv >/dev/null 2>&1
bin=$(bench_mendkv_bin)
port=${BENCH_BASE_PORT:-29701}
dir=$(mktemp -d)
pids=(0 0 0 0)
stop_node() {
  local i=$1
  if [ "${pids[$i]}" != 0 ]; then
    kill -INT "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
    pids[$i]=0
  fi
}
stop_all() { for i in 0 1 2 3; do stop_node "$i"; done; }
trap 'stop_all; rm -rf "$dir"' EXIT

# start_node I MODE: node I+1 (node1 is every other node's seed).
start_node() {
  local i=$1 mode=$2 seed=""
  BENCH_SERVER_ENV=""
  [ "$mode" = unthrottled ] && BENCH_SERVER_ENV="MENDKV_REPAIR_CONTROLLER__ENABLED=false MENDKV_ANTI_ENTROPY__RATE_LIMIT_BYTES_PER_S=0"
  [ "$i" -gt 0 ] && seed=$((port + 1000))
  bench_start_server "node$((i + 1))" $((port + i)) $((port + 1000 + i)) "$dir/cluster/node$((i + 1))" \
    "$dir/cluster/node$((i + 1)).log" $seed
  pids[$i]=$BENCH_SERVER_PID
}
nodes=(--node "http://127.0.0.1:$port" --node "http://127.0.0.1:$((port + 1))" --node "http://127.0.0.1:$((port + 2))")
# state_everywhere ID: the states of ID as nodes 1..4 see it, space-separated.
state_everywhere() {
  local i
  for i in 0 1 2 3; do
    curl -s "http://127.0.0.1:$((port + i))/cluster/status" | python3 -c '
import json, sys
try:
    nodes = json.load(sys.stdin)["nodes"]
except Exception:
    print("none"); sys.exit()
print(next((n.get("state") for n in nodes if n["id"] == sys.argv[1]), "none"))' "$1"
  done | tr '\n' ' '
}


results="$dir/results"
: >"$results"
for mode in $modes; do
  rm -rf "$dir/cluster" && mkdir -p "$dir/cluster"
  for i in 0 1 2; do start_node "$i" "$mode"; done
  loaded_at=$(date +%s.%N)
  "$bin" bench "${nodes[@]}" --workload w --ops 0 --preload --keys "$keys" --value-size 100 \
    --bucket join --concurrency 64 >/dev/null
  "$bin" bench "${nodes[@]}" --workload w --ops 0 --preload --keys "$foreground_keys" --bucket fg \
    --concurrency 32 >/dev/null
  echo "$mode: preloaded $keys keys in $(awk -v s="$loaded_at" -v e="$(date +%s.%N)" 'BEGIN { printf "%.0f", e - s }') s"
  sleep "$settle_s"
  [ "$rate" = auto ] && rate=$(half_capacity)
  before="- - -"
  [ "$rate" != 0 ] && before=$(foreground "$baseline_s")
  done_file="$dir/join.done"
  rm -f "$done_file"
  started=$(date +%s.%N)
  start_node 3 "$mode"
  # The 4th node is `normal` when all four see it so; the poller ends the foreground load.
  (
    until [ "$(state_everywhere node4)" = "normal normal normal normal " ]; do sleep 0.2; done
    awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f\n", e - s }' >"$dir/joined_s"
    touch "$done_file"
  ) &
  poller=$!
  if [ "$rate" = 0 ]; then
    wait "$poller"
    during="- - -"
  else
    during=$(foreground 3600 "$done_file")
    wait "$poller"
  fi
  joined_s=$(cat "$dir/joined_s")
  node4="http://127.0.0.1:$((port + 3))"
  streamed_keys=$(bench_metric "$node4" mendkv_streaming_keys_total 'direction="in"')
  streamed_bytes=$(bench_metric "$node4" mendkv_streaming_bytes_total 'direction="in"')
  ranges=$(bench_metric "$node4" mendkv_streaming_ranges_total)
  per_s=$(awk -v k="$streamed_keys" -v b="$streamed_bytes" -v t="$joined_s" \
    'BEGIN { printf "%.0f keys/s, %.1f MB/s", k / t, b / t / 1e6 }')
  echo "| $mode | $keys | $before | $during | $joined_s s | $streamed_keys keys, $((streamed_bytes / 1000000)) MB, $ranges ranges | $per_s |" | tee -a "$results"
  stop_all
done
echo
echo "| mode | keys | before the join: ops/s p50 p99 (ms) | during the join: ops/s p50 p99 (ms) | start to normal | streamed in | rate over that time |"
echo "|---|---|---|---|---|---|---|"
cat "$results"
