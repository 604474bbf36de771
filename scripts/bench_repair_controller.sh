#!/usr/bin/env bash
# Repair against foreground load (issue 18, part 1): node 3 of a 3-node release cluster misses
# MISSING keys (it was stopped while they were written at w=quorum, with hinted handoff off so
# only anti-entropy can bring them), then it returns and `mendkv repair` runs on it, under a
# steady open-loop foreground load (`mendkv bench --rate`, workload a: 50% reads at r=quorum,
# 50% writes at w=quorum, on other keys) at about half the cluster's capacity, and without
# foreground load, in three modes on fresh clusters:
#   fixed       the repair controller off: the fixed `anti_entropy.rate_limit_bytes_per_s`
#   unthrottled the controller off and no rate limit
#   controller  the repair controller on (defaults: the p99 limit follows the p99 without repair)
#   controller_absolute  the controller judging by `target_p99_ms` alone (headroom 0)
# For each: foreground p50/p99 with no repair (before node 3 stops) and during the repair,
# and the time from node 3's restart to the end of the repair run.
#   scripts/bench_repair_controller.sh [MISSING=200000] [FOREGROUND_OPS_PER_S=auto]
# MODES (default "fixed unthrottled controller") picks modes; BENCH_BASE_PORT the ports.
# A benchmark, not a test: CI never runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib_bench.sh
missing=${1:-200000}
rate=${2:-auto}
modes=${MODES:-fixed unthrottled controller_absolute controller}
baseline_s=${BASELINE_S:-15}
foreground_keys=20000
[ -n "${MENDKV_BIN:-}" ] || cargo build --release --locked -p mendkv >/dev/null 2>&1
bin=$(bench_mendkv_bin)
port=${BENCH_BASE_PORT:-28701}
dir=$(mktemp -d)
pids=(0 0 0)
stop_node() {
  local i=$1
  if [ "${pids[$i]}" != 0 ]; then
    kill -INT "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
    pids[$i]=0
  fi
}
stop_all() { for i in 0 1 2; do stop_node "$i"; done; }
trap 'stop_all; rm -rf "$dir"' EXIT

# start_node I MODE: node I+1 of the current cluster, in the mode's configuration.
start_node() {
  local i=$1 mode=$2 env=(MENDKV_HINTED_HANDOFF__ENABLED=false)
  case $mode in
    fixed) env+=(MENDKV_REPAIR_CONTROLLER__ENABLED=false) ;;
    unthrottled) env+=(MENDKV_REPAIR_CONTROLLER__ENABLED=false MENDKV_ANTI_ENTROPY__RATE_LIMIT_BYTES_PER_S=0) ;;
    controller) env+=(MENDKV_REPAIR_CONTROLLER__ENABLED=true) ;;
    controller_absolute) env+=(MENDKV_REPAIR_CONTROLLER__ENABLED=true MENDKV_REPAIR_CONTROLLER__BASELINE_HEADROOM_PERCENT=0) ;;
  esac
  local seed=
  [ "$i" -gt 0 ] && seed=$((port + 1000))
  BENCH_SERVER_ENV="${env[*]}" bench_start_server "node$((i + 1))" "$((port + i))" "$((port + 1000 + i))" \
    "$dir/cluster/node$((i + 1))" "$dir/cluster/node$((i + 1)).log" "$seed" || return 1
  pids[$i]=$BENCH_SERVER_PID
}
nodes=(--node "http://127.0.0.1:$port" --node "http://127.0.0.1:$((port + 1))" --node "http://127.0.0.1:$((port + 2))")
members() { curl -s "http://127.0.0.1:$port/cluster/status" | grep -o '"status":"up"' | wc -l; }


results="$dir/results"
: >"$results"
for mode in $modes; do
  for load in foreground none; do
    [ "$mode" = fixed ] || [ "$mode" = controller_absolute ] && [ "$load" = none ] && continue
    rm -rf "$dir/cluster" && mkdir -p "$dir/cluster"
    for i in 0 1 2; do start_node "$i" "$mode"; done
    until [ "$(members)" -ge 3 ]; do sleep 0.2; done
    "$bin" bench "${nodes[@]}" --workload w --ops 0 --preload --keys "$foreground_keys" --bucket fg \
      --concurrency 32 >/dev/null
    [ "$rate" = auto ] && rate=$(half_capacity)
    before="-"
    [ "$load" = foreground ] && before=$(foreground "$baseline_s")
    stop_node 2
    "$bin" bench "${nodes[@]:0:4}" --workload w --ops 0 --preload --preload-w quorum --keys "$missing" \
      --bucket missing --concurrency 32 >/dev/null
    started=$(date +%s.%N)
    start_node 2 "$mode"
    done_file="$dir/repair.done"
    rm -f "$done_file"
    (
      "$bin" repair --node "http://127.0.0.1:$((port + 2))" >"$dir/repair.out" 2>&1 || echo "repair failed" >>"$dir/repair.out"
      touch "$done_file"
    ) &
    repair_pid=$!
    during="-"
    if [ "$load" = foreground ]; then
      during=$(foreground 3600 "$done_file")
    fi
    wait "$repair_pid"
    converged=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    # Exact check: node 3 holds every missing key (a sample of 200 read locally).
    held=0
    for k in $(seq 0 $((missing / 200)) $((missing - 1)) | head -200); do
      code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((port + 2))/admin/local/missing/key$k")
      [ "$code" = 200 ] && held=$((held + 1))
    done
    repaired=$(grep -o '[0-9]* repaired' "$dir/repair.out" | tail -1 || true)
    echo "| $mode | $load | $before | $during | ${converged} s | $held/200 | ${repaired:-?} |" | tee -a "$results"
    stop_all
  done
done
echo
echo "| mode | foreground | without repair: ops/s p50 p99 (ms) | during repair: ops/s p50 p99 (ms) | restart to repaired | sample on node 3 | keys node 3's run repaired |"
echo "|---|---|---|---|---|---|---|"
cat "$results"
