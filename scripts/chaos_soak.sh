#!/usr/bin/env bash
# Soak of the chaos harness: seeded runs of real mendkv servers in network namespaces
# (3 and 5 nodes in turn) under partitions, kill -9 and pauses, for SOAK_S seconds (an hour
# by default), then the table of results (docs/benchmarks.md's "Chaos soak"). Needs root,
# iproute2 and nftables. Exits non-zero on any violation; each failing run prints its rerun
# line. Environment: SOAK_S (3600), RUN_S (60, workload per run), SEED (first seed; default
# from the date), NODES (3,5), PROFILE (debug or release; release by default).
set -euo pipefail
cd "$(dirname "$0")/.."

soak_s="${SOAK_S:-3600}"
run_s="${RUN_S:-60}"
seed="${SEED:-$(date +%Y%m%d)000}"
nodes="${NODES:-3,5}"
profile="${PROFILE:-release}"

if [ "$profile" = release ]; then
  cargo build --release --locked -p mendkv -p mendkv-chaos
  dir="${CARGO_TARGET_DIR:-target}/release"
else
  cargo build --locked -p mendkv -p mendkv-chaos
  dir="${CARGO_TARGET_DIR:-target}/debug"
fi

# The soak runs copies of the binaries: a rebuild in the same target directory while it runs
# must not change the server a kill -9 restart starts half-way through.
bin="$(mktemp -d -t mendkv-chaos-soak-bin.XXXXXX)"
trap 'rm -rf "$bin"' EXIT
cp "$dir/mendkv" "$dir/mendkv-chaos" "$bin/"
log="$(mktemp -t mendkv-chaos-soak.XXXXXX.log)"
echo "chaos soak: ${soak_s} s, runs of ${run_s} s, nodes ${nodes}, first seed ${seed}, ${profile} build; log ${log}"
echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cores: $(uname -srm); commit $(git rev-parse --short HEAD); $(uptime)"
status=0
"$bin/mendkv-chaos" --mendkv "$bin/mendkv" --nodes "$nodes" --seed "$seed" \
  --duration-s "$run_s" --runs 100000 --budget-s "$soak_s" 2>&1 | tee "$log" || status=$?
echo "finished $(date -u +%Y-%m-%dT%H:%M:%SZ)"
exit "$status"
