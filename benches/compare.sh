#!/usr/bin/env bash
# W1, W4 and W5 on two builds of drover in one run, alternating them (A B B A), so that a
# change's effect is a ratio measured on the same machine at the same time.
#
#   benches/compare.sh BEFORE_DIR AFTER_DIR
#
# Each directory holds the release binaries of one build: `drover`, and the bench targets
# `workloads` (W1), `w5` or `scale` (W5) and `w4` (copy them from target/release/deps/<name>-<hash> after
# `cargo bench --no-run`; `benches/collect-bins.sh DIR` does it for the current checkout).
# Env: W1_N (10000), W5_N (100000), W5_WORKERS (1000), PAIRS (2), W4 (1: run W4, ~4 min a pair),
# OUT (results file).
set -euo pipefail
before=$(cd "$1" && pwd)
after=$(cd "$2" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
W1_N=${W1_N:-10000}
W5_N=${W5_N:-100000}
W5_WORKERS=${W5_WORKERS:-1000}
PAIRS=${PAIRS:-2}
W4=${W4:-1}
OUT=${OUT:-$root/benches/compare-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for _ in $(seq "$W1_N"); do echo true; done >"$tmp/w1.txt"
if [ "$W4" = 1 ]; then
    cc -O2 -o "$tmp/touch_mem" "$root/benches/w4/touch_mem.c"
    python3 "$root/benches/w4/gen_tasks.py" 120 4 >"$tmp/w4.tasks"
fi
: >"$OUT"

tag() { sed "s/}\$/, \"build\": \"$1\", \"pair\": $2}/"; }

one() { # build-name dir pair
    local name=$1 dir=$2 pair=$3 t0 t1
    DROVER_BIN="$dir/drover" "$dir/workloads" --workloads W1 --w1-n "$W1_N" | tag "$name" "$pair" | tee -a "$OUT"
    t0=$(date +%s.%N)
    (cd "$tmp" && "$dir/drover" run w1.txt --failed-dir "$tmp/failed" 2>/dev/null)
    t1=$(date +%s.%N)
    python3 -c "import json; w=$t1-$t0; print(json.dumps({'system':'drover run','workload':'W1','n':$W1_N,'wall_s':round(w,3),'tasks_per_s':round($W1_N/w,1),'build':'$name','pair':$pair}))" | tee -a "$OUT"
    # W5: the old `w5` bench, or the `scale` bench that replaced it with the same measure.
    if [ -x "$dir/scale" ]; then
        "$dir/scale" --tasks "$W5_N" --workers "$W5_WORKERS" --procs 1 --variant plain \
            | sed 's/"workload":"scale"/"workload":"W5"/; s/"dispatch_per_s"/"tasks_per_s"/' \
            | tag "$name" "$pair" | tee -a "$OUT"
    else
        "$dir/w5" --tasks "$W5_N" --workers "$W5_WORKERS" | tag "$name" "$pair" | tee -a "$OUT"
    fi
    if [ "$W4" = 1 ]; then
        "$dir/w4" --tasks "$tmp/w4.tasks" --touch "$tmp/touch_mem" --drover "$dir/drover" \
            --modes oracle,bucketing | tag "$name" "$pair" | tee -a "$OUT"
    fi
}

xargs_w1() {
    local t0 t1
    t0=$(date +%s.%N)
    xargs -P "$(nproc)" -n 1 true <"$tmp/w1.txt"
    t1=$(date +%s.%N)
    python3 -c "import json; w=$t1-$t0; print(json.dumps({'system':'xargs','workload':'W1','n':$W1_N,'wall_s':round(w,3),'tasks_per_s':round($W1_N/w,1),'pair':$1}))" | tee -a "$OUT"
}

for pair in $(seq "$PAIRS"); do
    xargs_w1 "$pair"
    one before "$before" "$pair"
    one after "$after" "$pair"
    one after "$after" "$pair"
    one before "$before" "$pair"
    xargs_w1 "$pair"
done

python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(pred, key):
    v = [r[key] for r in rows if pred(r) and key in r]
    return statistics.median(v) if v else float("nan")
xargs = med(lambda r: r["system"] == "xargs", "tasks_per_s")
print(f"xargs -P nproc: {xargs:.0f} tasks/s (median)")
print("| measure | before | after | after / before |")
print("|---|---|---|---|")
def line(label, pred, key, fmt="{:.1f}"):
    b = med(lambda r: r.get("build") == "before" and pred(r), key)
    a = med(lambda r: r.get("build") == "after" and pred(r), key)
    print(f"| {label} | {fmt.format(b)} | {fmt.format(a)} | {a / b:.3f} |")
line("W1 library, tasks/s", lambda r: r["system"] == "drover" and r.get("workload") == "W1", "tasks_per_s", "{:.0f}")
line("W1 `drover run`, tasks/s", lambda r: r["system"] == "drover run", "tasks_per_s", "{:.0f}")
line("W5 master CPU us/task", lambda r: r.get("workload") == "W5", "master_cpu_us_per_task")
line("W5 bytes per queued task", lambda r: r.get("workload") == "W5", "master_bytes_per_queued_task", "{:.0f}")
line("W5 tasks/s", lambda r: r.get("workload") == "W5", "tasks_per_s", "{:.0f}")
line("W4 oracle makespan s", lambda r: r.get("mode") == "oracle", "wall_s")
line("W4 bucketing makespan s", lambda r: r.get("mode") == "bucketing", "wall_s")
for b in ("before", "after"):
    run = med(lambda r: r["system"] == "drover run" and r.get("build") == b, "tasks_per_s")
    print(f"{b}: drover run / xargs = {run / xargs:.2f}")
PY
