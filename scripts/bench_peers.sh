#!/usr/bin/env bash
# mendkv side by side with etcd and Redis on this machine, in one run, interleaved: each
# round runs every case on every system in turn, so background noise spreads over all.
#   scripts/bench_peers.sh [seconds per case] [rounds]        (defaults: 10 s, 3 rounds)
# Workload (issue 15): wrk -t3 -c33 (BENCH_CONNECTIONS), thread i on server i; keys
# `key-%06d` uniform over 100,000 keys (BENCH_KEYS), all preloaded; 100-byte values.
# - etcd 3.4 (Debian), 3 members on localhost, through its v3 JSON gateway (Raft + fsync).
# - Redis 7 (Debian), primary + 2 replicas, no persistence, by redis-benchmark (-c 33,
#   --threads 3, -r KEYS); GETs at r=one go to a replica.
# - mendkv: `mendkv cluster` (3 nodes, release build, default config: fsync always), bucket
#   `bench` set to lww, PUT w=quorum without context (blind writes), GET r=quorum, r=one.
# A second mendkv, "mendkv_b", joins the run when MENDKV_BIN_B or MENDKV_B_ENV is set (its
# binary, default the same; NAME=value words for its nodes' environment): A against B in the
# same run, interleaved. BENCH_SYSTEMS picks systems (default "etcd redis mendkv [mendkv_b]").
# CPU per operation is the servers' user+system CPU time over the case (/proc/PID/stat)
# divided by the operations wrk or redis-benchmark completed. Needs root for apt (once).
# A benchmark, not a test: CI never runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib_bench.sh
seconds=${1:-10}
rounds=${2:-3}
connections=${BENCH_CONNECTIONS:-33}
keys=${BENCH_KEYS:-100000}
threads=3
tick=$(getconf CLK_TCK)

missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -n "${MENDKV_BIN:-}" ] || cargo build --release --locked -p mendkv >/dev/null 2>&1
bin=$(bench_mendkv_bin)

with_b=
[ -n "${MENDKV_BIN_B:-}${MENDKV_B_ENV:-}" ] && with_b=mendkv_b
systems=${BENCH_SYSTEMS:-etcd redis mendkv $with_b}
runs() { [[ " $systems " == *" $1 "* ]]; }

dir=$(mktemp -d)
etcd_pids=()
redis_pids=()
mendkv_pids=()
mendkv_b_pids=()
cluster_a=
cluster_b=
cleanup() {
  for BENCH_CLUSTER_PID in $cluster_a $cluster_b; do bench_stop_cluster; done
  for pid in "${etcd_pids[@]}" "${redis_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${etcd_pids[@]}" "${redis_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

# etcd: three members, clients on 23791-23793, peers on 23801-23803.
initial=""
for i in 1 2 3; do initial+="${initial:+,}e$i=http://127.0.0.1:$((23800 + i))"; done
for i in 1 2 3; do
  runs etcd || break
  etcd --name "e$i" --data-dir "$dir/etcd$i" \
    --listen-client-urls "http://127.0.0.1:$((23790 + i))" --advertise-client-urls "http://127.0.0.1:$((23790 + i))" \
    --listen-peer-urls "http://127.0.0.1:$((23800 + i))" --initial-advertise-peer-urls "http://127.0.0.1:$((23800 + i))" \
    --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token bench \
    --logger zap --log-level error >"$dir/etcd$i.log" 2>&1 &
  etcd_pids+=($!)
done
# Redis: primary on 26379, replicas on 26380 and 26381; no RDB, no AOF.
for i in 0 1 2; do
  runs redis || break
  replica=()
  [ "$i" -gt 0 ] && replica=(--replicaof 127.0.0.1 26379)
  redis-server --port $((26379 + i)) --save "" --appendonly no --dir "$dir" \
    --dbfilename "redis$i.rdb" "${replica[@]}" >"$dir/redis$i.log" 2>&1 &
  redis_pids+=($!)
done
# mendkv: HTTP on 28301-28303.
# mendkv: HTTP on 28301-28303; mendkv_b on 28311-28313.
mendkv_port=${BENCH_BASE_PORT:-28301}
mendkv_b_port=$((mendkv_port + 10))
if runs mendkv; then
  mkdir -p "$dir/mendkv"
  bench_start_cluster "$dir/mendkv" "$mendkv_port"
  cluster_a=$BENCH_CLUSTER_PID
  bench_set_lww bench "$mendkv_port"
  read -r -a mendkv_pids <<<"$(bench_cluster_node_pids)"
fi
if runs mendkv_b; then
  mkdir -p "$dir/mendkv_b"
  MENDKV_BIN=${MENDKV_BIN_B:-$bin} BENCH_CLUSTER_ENV=${MENDKV_B_ENV:-} bench_start_cluster "$dir/mendkv_b" "$mendkv_b_port"
  cluster_b=$BENCH_CLUSTER_PID
  bench_set_lww bench "$mendkv_b_port"
  read -r -a mendkv_b_pids <<<"$(bench_cluster_node_pids)"
fi
for i in 1 2 3; do
  runs etcd || break
  for _ in $(seq 1 300); do
    curl -sf -o /dev/null -X POST "http://127.0.0.1:$((23790 + i))/v3/kv/range" -d '{"key":"AA=="}' && break
    sleep 0.1
  done
done
for i in 0 1 2; do
  runs redis || break
  until redis-cli -p $((26379 + i)) ping 2>/dev/null | grep -q PONG; do sleep 0.1; done
done
if runs redis; then
  until redis-cli -p 26379 info replication | grep -q "connected_slaves:2"; do sleep 0.1; done
fi

etcd_targets="127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
mendkv_targets="127.0.0.1:$mendkv_port,127.0.0.1:$((mendkv_port + 1)),127.0.0.1:$((mendkv_port + 2))"
mendkv_b_targets="127.0.0.1:$mendkv_b_port,127.0.0.1:$((mendkv_b_port + 1)),127.0.0.1:$((mendkv_b_port + 2))"
results="$dir/results"
: >"$results"

# wrk_case SYSTEM CASE TARGETS MODE QUERY PIDS...: one timed wrk run, recorded in $results.
wrk_case() {
  local system=$1 case=$2 targets=$3 mode=$4 query=$5 before after
  shift 5
  before=$(bench_cpu_ticks "$@")
  BENCH_TARGETS=$targets BENCH_MODE=$mode BENCH_QUERY=$query BENCH_KEYS=$keys BENCH_THREADS=$threads \
    wrk -t"$threads" -c"$connections" -d"${seconds}s" --latency -s scripts/bench/kv.lua "http://${targets%%,*}/" >"$dir/wrk.out"
  after=$(bench_cpu_ticks "$@")
  record "$system" "$case" "$(bench_wrk_summary "$dir/wrk.out")" $((after - before))
}

# redis_case CASE PORT TEST: one redis-benchmark run of about $seconds, recorded in $results.
redis_case() {
  local case=$1 port=$2 test=$3 before after line
  before=$(bench_cpu_ticks "${redis_pids[@]}")
  line=$(redis-benchmark -p "$port" -t "$test" -n $((seconds * 60000)) -c "$connections" -r "$keys" -d 100 \
    --threads "$threads" --csv | tail -1 | tr -d '"')
  after=$(bench_cpu_ticks "${redis_pids[@]}")
  # CSV: test,rps,avg,min,p50,p95,p99,max
  IFS=, read -r _ rate _ _ _ _ p99 _ <<<"$line"
  record redis "$case" "${rate%.*} $p99 $((seconds * 60000)) 0" $((after - before))
}

# record SYSTEM CASE "RATE P99 REQUESTS ERRORS" CPU_TICKS
record() {
  local system=$1 case=$2 rate p99 requests errors
  read -r rate p99 requests errors <<<"$3"
  local cpu_us
  cpu_us=$(awk -v t="$4" -v hz="$tick" -v n="$requests" 'BEGIN { printf "%.1f", n ? t * 1e6 / hz / n : 0 }')
  echo "$round $case $system $rate $p99 $cpu_us $errors" >>"$results"
  printf '  round %s %-10s %-7s %8s ops/s  p99 %7s ms  cpu %7s us/op  errors %s\n' \
    "$round" "$case" "$system" "$rate" "$p99" "$cpu_us" "$errors"
}

# Preload every key once on each system (so GETs find values): wrk writes them in order and
# each thread leaves a marker file when done; wrk is then stopped.
preload() {
  local done_dir pid
  done_dir=$(mktemp -d "$dir/preload-XXXX")
  mkdir -p "$done_dir"
  BENCH_TARGETS=$1 BENCH_MODE=$2 BENCH_QUERY=$3 BENCH_KEYS=$keys BENCH_THREADS=$threads BENCH_PRELOAD=1 \
    BENCH_DONE_DIR=$done_dir wrk -t"$threads" -c"$connections" -d600s -s scripts/bench/kv.lua "http://${1%%,*}/" >/dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ "$(find "$done_dir" -name 'thread-*' | wc -l)" -lt "$threads" ]; do
    sleep 0.2
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
echo "preloading $keys keys"
runs etcd && preload "$etcd_targets" etcd_put ""
runs mendkv && preload "$mendkv_targets" mendkv_put w=quorum
runs mendkv_b && preload "$mendkv_b_targets" mendkv_put w=quorum
runs redis && redis-benchmark -p 26379 -t set -n "$keys" -c "$connections" -r "$keys" -d 100 -q >/dev/null

# run_case CASE: the case on every system, in turn.
run_case() {
  local case=$1 etcd_query="" mendkv_mode=mendkv_get mendkv_query redis_port=26379 redis_test=get
  case $case in
    put) mendkv_mode=mendkv_put mendkv_query=w=quorum redis_test=set ;;
    get_quorum) mendkv_query=r=quorum ;;
    get_one) etcd_query=serializable mendkv_query=r=one redis_port=26380 ;;
  esac
  local etcd_mode=etcd_get
  [ "$case" = put ] && etcd_mode=etcd_put
  if runs etcd; then wrk_case etcd "$case" "$etcd_targets" "$etcd_mode" "$etcd_query" "${etcd_pids[@]}"; fi
  if runs redis; then redis_case "$case" "$redis_port" "$redis_test"; fi
  if runs mendkv; then wrk_case mendkv "$case" "$mendkv_targets" "$mendkv_mode" "$mendkv_query" "${mendkv_pids[@]}"; fi
  if runs mendkv_b; then wrk_case mendkv_b "$case" "$mendkv_b_targets" "$mendkv_mode" "$mendkv_query" "${mendkv_b_pids[@]}"; fi
}
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  for case in ${BENCH_CASES:-put get_quorum get_one}; do run_case "$case"; done
done

echo
echo "RSS KiB after the run: etcd $(bench_rss_kib "${etcd_pids[@]}")| redis $(bench_rss_kib "${redis_pids[@]}")| mendkv $(bench_rss_kib "${mendkv_pids[@]}")| mendkv_b $(bench_rss_kib "${mendkv_b_pids[@]}")"
echo
# One line per case: mean ops/s over the rounds, worst p99, mean CPU per op, for each system;
# mendkv's ratio to etcd and to Redis; mendkv's last round over its first (stability).
awk -v rounds="$rounds" -v with_b="$with_b" '
  { key = $2 " " $3; rate[key] += $4; cpu[key] += $6; if ($5 > p99[key]) p99[key] = $5; errors[key] += $7
    if ($1 == 1) first[key] = $4; if ($1 == rounds) last[key] = $4 }
  END {
    ns = split("etcd redis mendkv" (with_b ? " mendkv_b" : ""), systems, " ")
    header = "| case"; rule = "|---"
    for (j = 1; j <= ns; j++) { header = header " | " systems[j] " ops/s (p99 ms, CPU us/op)"; rule = rule "|---" }
    for (j = 3; j <= ns; j++) {
      header = header " | " systems[j] "/etcd | " systems[j] "/redis | " systems[j] " last/first round | " systems[j] " errors"
      rule = rule "|---|---|---|---"
    }
    print header " |"; print rule "|"
    n = split("put get_quorum get_one", cases, " ")
    for (i = 1; i <= n; i++) {
      c = cases[i]; line = "| " c
      for (j = 1; j <= ns; j++) {
        k = c " " systems[j]
        line = line sprintf(" | %.0f (%.1f, %.0f)", rate[k] / rounds, p99[k], cpu[k] / rounds)
      }
      e = rate[c " etcd"]; r = rate[c " redis"]
      for (j = 3; j <= ns; j++) {
        k = c " " systems[j]; m = rate[k]
        line = line sprintf(" | %.2fx | %.2fx | %.0f%% | %d", e ? m / e : 0, r ? m / r : 0,
          first[k] ? 100 * last[k] / first[k] : 0, errors[k])
      }
      print line " |"
    }
  }' "$results"
