#!/usr/bin/env bash
# W4, memory packing (BRIEF section 6), in one run: drover with an oracle
# allocation, fixed 4,000 MB, max-seen and k-means bucketing, then Work Queue
# 9.9 fixed 4,000 MB, MAX_THROUGHPUT and MIN_WASTE (monitoring on), all on the
# same 120 seeded tasks and one worker declaring 12 cores / 12,000 MB.
# Needs: cc; apt-get install -y coop-computing-tools python3-workqueue
# Usage: benches/w4/run.sh   Env: N (120), SEED (4), DROVER_MODES, WQ_MODES, OUT
# (set a MODES variable empty to skip that system)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
N=${N:-120}
SEED=${SEED:-4}
DROVER_MODES=${DROVER_MODES-oracle,fixed4000,max,bucketing}
WQ_MODES=${WQ_MODES-fixed4000,max_throughput,min_waste}
OUT=${OUT:-$root/benches/w4/results-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cc -O2 -pthread -o "$tmp/touch_mem" benches/w4/touch_mem.c
python3 benches/w4/gen_tasks.py "$N" "$SEED" >"$tmp/tasks"
cargo build --release --bin drover
cargo bench -p drover-master --bench w4 --no-run
target=${CARGO_TARGET_DIR:-$root/target}
: >"$OUT"
cargo bench -q -p drover-master --bench w4 -- --tasks "$tmp/tasks" --touch "$tmp/touch_mem" \
    --drover "$target/release/drover" --modes "$DROVER_MODES" | tee -a "$OUT"
if [ -n "$WQ_MODES" ]; then
    /usr/bin/python3 benches/w4/wq_w4.py --tasks "$tmp/tasks" --touch "$tmp/touch_mem" \
        --modes "$WQ_MODES" | tee -a "$OUT"
fi
# Ratios to drover's oracle, from this run.
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
oracle = next((r["wall_s"] for r in rows if r["system"] == "drover" and r["mode"] == "oracle"), None)
print("| system | mode | makespan s | x oracle | x bound | retries | lost |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    xo = "%.2f" % (r["wall_s"] / oracle) if oracle else "-"
    print("| %s | %s | %.1f | %s | %.2f | %d | %d |" % (r["system"], r["mode"], r["wall_s"], xo, r["ratio_to_bound"], r["retries"], r["lost"]))
PY
