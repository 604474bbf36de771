#!/usr/bin/env bash
# Hinted-handoff figures on a local 3-node cluster (release build):
#  1. write p50/p99 with all replicas up, then with node3 killed (hints being stored);
#  2. hint store size on disk per hint;
#  3. replay rate: node3 restarted, time until every holder reports 0 pending hints.
# Delivery is unthrottled (delivery_rate_per_s = 0) unless MENDKV_HINTED_HANDOFF__DELIVERY_RATE_PER_S is set.
#   scripts/bench_hints.sh [keys, default 20000]
set -euo pipefail
cd "$(dirname "$0")/.."
keys=${1:-20000}
cargo build --release -p mendkv >/dev/null 2>&1
bin=${MENDKV_BIN:-${CARGO_TARGET_DIR:-target}/release/mendkv}
dir=$(mktemp -d)
port=${BENCH_BASE_PORT:-29001}
export MENDKV_HINTED_HANDOFF__DELIVERY_RATE_PER_S=${MENDKV_HINTED_HANDOFF__DELIVERY_RATE_PER_S:-0}
export MENDKV_READ_REPAIR__ENABLED=false
"$bin" cluster --data-dir "$dir" --base-port "$port" >"$dir/cluster.out" 2>&1 &
cluster=$!
node3=""
trap 'kill -INT $cluster 2>/dev/null; [ -n "$node3" ] && kill $node3 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 300); do grep -q "cluster ready" "$dir/cluster.out" 2>/dev/null && break; sleep 0.1; done
n1="http://127.0.0.1:$port"; n2="http://127.0.0.1:$((port + 1))"
echo "== writes, all replicas up"
"$bin" bench --node "$n1" --node "$n2" --workload w --keys 1000000 --ops "$keys" --concurrency 32 --value-size 100 --bucket up | grep -E "ops/s|update"
pkill -9 -f -- "--node-id node3 " || true
sleep 0.5
echo "== writes, node3 killed (each write leaves a hint)"
"$bin" bench --node "$n1" --node "$n2" --workload w --keys 100000000 --ops "$keys" --concurrency 32 --value-size 100 --bucket down --seed 7 | grep -E "ops/s|update"
pending() { for u in "$n1" "$n2"; do curl -s "$u/cluster/status"; echo; done | python3 -c '
import json, sys
total = 0
for line in sys.stdin:
    line = line.strip()
    if not line: continue
    for n in json.loads(line)["nodes"]:
        if n["id"] == "node3": total += n["hints_pending"]
print(total)'; }
stored=$(pending)
hint_bytes=$(for u in "$n1" "$n2"; do curl -s "$u/metrics"; done | awk '/^mendkv_hints_bytes / { s += $2 } END { print s }')
echo "hints pending: $stored; stored hint bytes (keys + records): $hint_bytes = $((hint_bytes / stored)) B per hint"
start=$(date +%s.%N)
"$bin" server --node-id node3 --listen "127.0.0.1:$((port - 1000 + 2))" --http "127.0.0.1:$((port + 2))" \
  --seed "127.0.0.1:$((port - 1000))" --data-dir "$dir/node3" 2>>"$dir/node3.log" &
node3=$!
while [ "$(pending)" != "0" ]; do sleep 0.05; done
end=$(date +%s.%N)
python3 -c "print(f'replayed $stored hints in {($end - $start):.2f} s (includes node3 start-up and reconnect): {$stored / ($end - $start):.0f} hints/s')"
