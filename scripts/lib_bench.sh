# Shell functions shared by the benchmark scripts (source it; it is not run by itself).
# Everything here is for benchmarks on a developer machine, never for CI.

# The release binary the benchmarks run (MENDKV_BIN overrides).
bench_mendkv_bin() {
  echo "${MENDKV_BIN:-${CARGO_TARGET_DIR:-target}/release/mendkv}"
}

# bench_start_cluster DIR BASE_PORT [NODES]: starts `mendkv cluster` with its data under DIR
# and waits (up to 30 s) until it says it is ready. Sets BENCH_CLUSTER_PID; the nodes are its
# child processes (see bench_cluster_node_pids). BENCH_CLUSTER_ENV ("NAME=value ...") is set
# in the nodes' environment, e.g. TOKIO_WORKER_THREADS=1.
bench_start_cluster() {
  local dir=$1 port=$2 nodes=${3:-3}
  # shellcheck disable=SC2086 # a list of NAME=value words
  env ${BENCH_CLUSTER_ENV:-} "$(bench_mendkv_bin)" cluster --nodes "$nodes" --data-dir "$dir" --base-port "$port" >"$dir/cluster.out" 2>&1 &
  BENCH_CLUSTER_PID=$!
  for _ in $(seq 1 300); do
    grep -q "cluster ready" "$dir/cluster.out" 2>/dev/null && return 0
    sleep 0.1
  done
  cat "$dir/cluster.out" >&2
  return 1
}

# bench_stop_cluster: Ctrl-C to the cluster started by bench_start_cluster (its nodes stop
# cleanly), then waits for it.
bench_stop_cluster() {
  if [ -n "${BENCH_CLUSTER_PID:-}" ]; then
    kill -INT "$BENCH_CLUSTER_PID" 2>/dev/null || true
    wait "$BENCH_CLUSTER_PID" 2>/dev/null || true
    BENCH_CLUSTER_PID=
  fi
}

# bench_node_args BASE_PORT [NODES]: `--node URL` for every node, for `mendkv bench`.
bench_node_args() {
  local port=$1 nodes=${2:-3} i
  for ((i = 0; i < nodes; i++)); do
    printf -- '--node\nhttp://127.0.0.1:%d\n' $((port + i))
  done
}

# bench_cluster_node_pids: the pids of the cluster's node processes.
bench_cluster_node_pids() {
  pgrep -P "$BENCH_CLUSTER_PID" | tr '\n' ' '
}

# bench_set_lww BUCKET BASE_PORT [NODES]: makes BUCKET last-write-wins and waits until every
# node holds the change (gossip, about a second).
bench_set_lww() {
  local bucket=$1 port=$2 nodes=${3:-3} bin i
  bin=$(bench_mendkv_bin)
  "$bin" bucket set "$bucket" --resolution lww --node "http://127.0.0.1:$port" >/dev/null
  for ((i = 0; i < nodes; i++)); do
    until "$bin" bucket get "$bucket" --node "http://127.0.0.1:$((port + i))" | grep -q '"lww"'; do
      sleep 0.1
    done
  done
}

# bench_cpu_ticks PID...: user + system CPU time of the processes so far, in clock ticks
# (fields 14 and 15 of /proc/PID/stat; the command name in field 2 has no spaces here).
bench_cpu_ticks() {
  local total=0 pid fields
  for pid in "$@"; do
    read -r -a fields <"/proc/$pid/stat" || continue
    total=$((total + fields[13] + fields[14]))
  done
  echo "$total"
}

# bench_rss_kib PID...: resident memory of each process, in KiB, space-separated.
bench_rss_kib() {
  local pid
  for pid in "$@"; do
    awk '/^VmRSS:/ { printf "%s ", $2 }' "/proc/$pid/status"
  done
  echo
}

# bench_wait_http URL [SECONDS]: polls URL until it answers 200 (default 30 s).
bench_wait_http() {
  local url=$1 seconds=${2:-30} i
  for ((i = 0; i < seconds * 20; i++)); do
    curl -sf -o /dev/null "$url" && return 0
    sleep 0.05
  done
  return 1
}

# bench_wrk_summary FILE: "ops_per_s p99_ms requests errors" from `wrk --latency` output.
bench_wrk_summary() {
  awk '
    function ms(v) {
      if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
      if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
      if (v ~ /m$/) return substr(v, 1, length(v) - 1) * 60000
      if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
      return v + 0
    }
    /^ +99%/ { p99 = ms($2) }
    /requests in/ { requests = $1 }
    /Requests\/sec:/ { rate = $2 }
    /Non-2xx or 3xx responses:/ { errors += $NF }
    /Socket errors:/ { gsub(",", ""); errors += $4 + $6 + $8 + $10 }
    END { printf "%.0f %.2f %d %d\n", rate, p99, requests, errors }
  ' "$1"
}

# bench_stop_node: Ctrl-C to the single node whose pid is in $node (its stop is clean: memtables
# flushed), then waits for it and clears $node. For scripts that run one `mendkv server`.
bench_stop_node() {
  if [ -n "${node:-}" ]; then
    kill -INT "$node" 2>/dev/null || true
    wait "$node" 2>/dev/null || true
    node=
  fi
}

# bench_start_server ID HTTP_PORT PEER_PORT DATA_DIR LOG [SEED_PEER_PORT]: one `mendkv server`
# in the background (with a seed when given), waiting (up to 30 s) until it serves: a GET
# answers 200 or 404 (a node that has not heard the membership answers 503). The extra
# environment comes from BENCH_SERVER_ENV ("NAME=value ..."). Sets BENCH_SERVER_PID.
bench_start_server() {
  local id=$1 http=$2 peer=$3 data=$4 log=$5 seed=${6:-} seeds=() code
  [ -n "$seed" ] && seeds=(--seed "127.0.0.1:$seed")
  # shellcheck disable=SC2086 # a list of NAME=value words
  env ${BENCH_SERVER_ENV:-} "$(bench_mendkv_bin)" server --node-id "$id" --listen "127.0.0.1:$peer" \
    --http "127.0.0.1:$http" --data-dir "$data" "${seeds[@]}" 2>>"$log" &
  BENCH_SERVER_PID=$!
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http/kv/probe/k" || true)
    [ "$code" = 404 ] || [ "$code" = 200 ] && return 0
    sleep 0.1
  done
  echo "$id did not start (see $log)" >&2
  return 1
}

# bench_metric URL NAME [LABEL_FILTER]: the sum of a metric's samples in URL/metrics whose
# line matches LABEL_FILTER (a regular expression; default: all).
bench_metric() {
  curl -s "$1/metrics" | awk -v name="$2" -v filter="${3:-.}" '
    $1 ~ "^" name "({|$)" && $0 ~ filter { sum += $NF } END { printf "%.0f\n", sum }'
}

# foreground SECONDS [UNTIL_FILE]: the open-loop foreground load of the repair and join
# benchmarks (`mendkv bench --workload a --rate $rate` over "${nodes[@]}", 64 workers,
# $foreground_keys keys of 100 B in bucket fg; output in $dir/fg.out); prints
# "ops/s p50 p99" (ms, the worse of the read and write p99s). Uses the caller's bin, nodes,
# rate, foreground_keys and dir.
foreground() {
  local seconds=$1 until=${2:-} extra=()
  [ -n "$until" ] && extra=(--until-file "$until")
  "$bin" bench "${nodes[@]}" --workload a --rate "$rate" --duration-s "$seconds" "${extra[@]}" \
    --concurrency 64 --keys "$foreground_keys" --value-size 100 --bucket fg --seed 7 >"$dir/fg.out" 2>&1 || true
  awk '/ops\/s/ { rate = $1 } /p99/ { for (i = 1; i <= NF; i++) { if ($i == "p50") p50 = $(i + 1); if ($i == "p99" && $(i + 1) > p99) p99 = $(i + 1) } }
    END { printf "%s %s %s\n", rate, p50, p99 }' "$dir/fg.out"
}

# half_capacity: half the ops/s of a 10 s closed-loop run of the foreground workload (the
# open-loop rate of the repair and join benchmarks); says both on stderr. Uses the caller's
# bin, nodes, foreground_keys and dir.
half_capacity() {
  local capacity
  "$bin" bench "${nodes[@]}" --workload a --duration-s 10 --concurrency 64 --keys "$foreground_keys" \
    --bucket fg --seed 3 >"$dir/capacity.out" 2>&1
  capacity=$(awk '/ops\/s/ { print int($1) }' "$dir/capacity.out")
  echo "capacity (closed loop, workload a, 64 workers): $capacity ops/s; foreground load: $((capacity / 2)) ops/s" >&2
  echo $((capacity / 2))
}
