#!/usr/bin/env bash
# TLS on vs off, same run: starts a fresh local 3-node cluster (release build) per round, once
# plain and once with `[tls] peer` and `client` on (certificates made here with openssl), and
# runs quorum PUTs (workload w) then quorum GETs (workload c, preloaded) with `mendkv bench`
# against all three nodes. Rounds alternate off/on so load from elsewhere hits both alike.
#   scripts/bench_tls.sh [ROUNDS] [-- extra bench args]
#   e.g. scripts/bench_tls.sh 2 -- --ops 20000 --concurrency 32
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
shift || true
[ "${1:-}" = "--" ] && shift
extra=("$@")
[ ${#extra[@]} -eq 0 ] && extra=(--ops 20000 --concurrency 32 --value-size 100 --keys 10000)
cargo build --release -p mendkv >/dev/null 2>&1
bin=${MENDKV_BIN:-${CARGO_TARGET_DIR:-target}/release/mendkv}
dir=$(mktemp -d)
pids=()
stop() { for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop; rm -rf "$dir"' EXIT

# A CA and one node certificate (SAN 127.0.0.1, localhost) shared by the three nodes.
(
  cd "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key \
    -out ca.crt -days 2 -subj /CN=bench-ca 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout node.key \
    -out node.csr -subj /CN=bench-node 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >ext
  openssl x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out node.crt \
    -days 2 -extfile ext 2>/dev/null
)

round() { # $1 = off|on, $2 = round number
  local mode=$1 n=$2 port=${BENCH_BASE_PORT:-29001} scheme=http tls_env=() curl_tls=() bench_tls=()
  if [ "$mode" = on ]; then
    scheme=https
    tls_env=(MENDKV_TLS__CERT_FILE="$dir/node.crt" MENDKV_TLS__KEY_FILE="$dir/node.key"
      MENDKV_TLS__CA_FILE="$dir/ca.crt" MENDKV_TLS__PEER=true MENDKV_TLS__CLIENT=true)
    curl_tls=(--cacert "$dir/ca.crt")
    bench_tls=(--cacert "$dir/ca.crt")
  fi
  local data="$dir/$mode-$n"
  for i in 0 1 2; do
    local seed=()
    [ "$i" -gt 0 ] && seed=(--seed "127.0.0.1:$((port + 100))")
    mkdir -p "$data/n$i"
    env "${tls_env[@]}" RUST_LOG=warn "$bin" server --node-id "n$i" --listen "127.0.0.1:$((port + 100 + i))" \
      --http "127.0.0.1:$((port + i))" --data-dir "$data/n$i" "${seed[@]}" 2>"$data/n$i.log" &
    pids+=($!)
  done
  local ready=0
  for _ in $(seq 1 300); do
    ready=1
    for i in 0 1 2; do
      up=$(curl -s "${curl_tls[@]}" "$scheme://127.0.0.1:$((port + i))/cluster/status" | grep -o '"status":"up"' | wc -l || true)
      [ "$up" -eq 3 ] || ready=0
    done
    [ $ready -eq 1 ] && break
    sleep 0.1
  done
  [ $ready -eq 1 ] || { echo "cluster ($mode) not ready"; cat "$data"/n*.log; exit 1; }
  local nodes=(--node "$scheme://127.0.0.1:$port" --node "$scheme://127.0.0.1:$((port + 1))" --node "$scheme://127.0.0.1:$((port + 2))")
  echo "== round $n, TLS $mode: quorum PUT (workload w)"
  "$bin" bench "${nodes[@]}" "${bench_tls[@]}" --workload w --bucket put "${extra[@]}"
  echo "== round $n, TLS $mode: quorum GET (workload c, preloaded)"
  "$bin" bench "${nodes[@]}" "${bench_tls[@]}" --workload c --bucket get --preload "${extra[@]}"
  stop
}

for n in $(seq 1 "$rounds"); do
  round off "$n"
  round on "$n"
done
