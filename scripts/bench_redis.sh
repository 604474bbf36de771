#!/usr/bin/env bash
# Redis vs mendkv through redis-benchmark, side by side in one run on this machine:
# - Redis: Debian's redis-server, a primary and two replicas (`--replicaof`), default
#   settings (only port and working directory set);
# - mendkv: `mendkv cluster` (release build), 3 nodes, RF 3, RESP with w=quorum and
#   r=quorum, fsync = always (the defaults).
# Each runs `redis-benchmark -t set,get -n N -d 100 -r 100000 -c 50`, then the same with
# `-P 16`, against the primary / node 1. Prints ops/s, p50 and p99 and mendkv's share.
#   scripts/bench_redis.sh [N]          (N defaults to 500000)
# Installs redis-server and redis-tools when missing (apt-get, as root or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-500000}
redis_port=${BENCH_REDIS_PORT:-26379}
mendkv_http=${BENCH_MENDKV_BASE_PORT:-28101} # RESP on +1000, peers on -1000
mendkv_resp=$((mendkv_http + 1000))

if [ ! -x /usr/bin/redis-server ] || [ ! -x /usr/bin/redis-benchmark ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server redis-tools
fi
cargo build --release --locked -p mendkv >/dev/null
bin=${MENDKV_BIN:-${CARGO_TARGET_DIR:-target}/release/mendkv}

dir=$(mktemp -d)
pids=()
stop() {
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap 'stop; rm -rf "$dir"' EXIT

# Redis: primary and two replicas, each in its own directory.
for i in 0 1 2; do
  mkdir -p "$dir/redis$i"
  replica=()
  [ "$i" -gt 0 ] && replica=(--replicaof 127.0.0.1 "$redis_port")
  redis-server --port $((redis_port + i)) --dir "$dir/redis$i" "${replica[@]}" \
    >"$dir/redis$i.log" 2>&1 &
  pids+=($!)
done
# mendkv: three nodes under one `mendkv cluster`.
RUST_LOG=warn "$bin" cluster --nodes 3 --data-dir "$dir/mendkv" --base-port "$mendkv_http" \
  >"$dir/mendkv.log" 2>&1 &
pids+=($!)

wait_for() { # $1 = what, then a command that succeeds once it is ready
  local what=$1
  shift
  for _ in $(seq 1 600); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "$what not ready"
  tail -n 20 "$dir"/*.log
  exit 1
}
replicas_up() {
  [ "$(redis-cli -p "$redis_port" info replication | grep -c 'state=online')" -eq 2 ]
}
mendkv_up() {
  for i in 0 1 2; do
    [ "$(curl -s "http://127.0.0.1:$((mendkv_http + i))/cluster/status" | grep -o '"status":"up"' | wc -l)" -eq 3 ] || return 1
    redis-cli -p $((mendkv_resp + i)) ping | grep -q PONG || return 1
  done
}
wait_for "redis replicas" replicas_up
wait_for "mendkv cluster" mendkv_up

declare -A rate p50 p99
bench() { # $1 = redis|mendkv, $2 = port, $3 = pipeline depth
  local out
  # redis-benchmark stops at the first error reply: the run is then reported as failed.
  if ! out=$(redis-benchmark -h 127.0.0.1 -p "$2" -t set,get -n "$requests" -d 100 -r 100000 \
    -c 50 -P "$3" --csv 2>&1); then
    echo "  $1 -P $3 FAILED: $(echo "$out" | grep -v '^"' | head -3)" >&2
    if [ "$1" = mendkv ]; then
      grep -h 'WARN\|ERROR' "$dir"/mendkv/*/server.log | grep -v 'no epoch record' | tail -n 5 >&2 || true
    fi
  fi
  echo "$out" | sed "s/^/  $1 -P $3: /" >&2
  while IFS=, read -r test rps _avg _min median _p95 tail _max; do
    test=${test//\"/}
    [ "$test" = SET ] || [ "$test" = GET ] || continue
    rate[$1,$3,$test]=${rps//\"/}
    p50[$1,$3,$test]=${median//\"/}
    p99[$1,$3,$test]=${tail//\"/}
  done <<<"$out"
}
echo "redis-benchmark -t set,get -n $requests -d 100 -r 100000 -c 50 [-P 16]; $(nproc) cores," \
  "load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ), mendkv $(git rev-parse --short HEAD)" >&2
for pipeline in 1 16; do
  bench redis "$redis_port" "$pipeline"
  bench mendkv "$mendkv_resp" "$pipeline"
done

printf '| %-4s | %-3s | %12s | %9s | %9s | %12s | %9s | %9s | %13s |\n' \
  test -P "redis ops/s" "p50 ms" "p99 ms" "mendkv ops/s" "p50 ms" "p99 ms" "mendkv/redis"
printf '|------|-----|-------------:|----------:|----------:|-------------:|----------:|----------:|--------------:|\n'
for pipeline in 1 16; do
  for test in SET GET; do
    r=${rate[redis,$pipeline,$test]:-0} m=${rate[mendkv,$pipeline,$test]:-0}
    printf '| %-4s | %-3s | %12s | %9s | %9s | %12s | %9s | %9s | %12.0f%% |\n' "$test" "$pipeline" \
      "$r" "${p50[redis,$pipeline,$test]:-failed}" "${p99[redis,$pipeline,$test]:-failed}" \
      "$m" "${p50[mendkv,$pipeline,$test]:-failed}" "${p99[mendkv,$pipeline,$test]:-failed}" \
      "$(echo "if ($r > 0) 100 * $m / $r else 0" | bc -l)"
  done
done
