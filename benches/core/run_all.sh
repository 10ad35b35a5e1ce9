#!/usr/bin/env bash
# W1-W3 (BRIEF section 6) on drover, next to `xargs -P 2` (this machine's
# process start-up limit) and Work Queue 9.9, in one run, REPEAT times.
# Prints every JSON line, then the ratios per round. Needs:
#   apt-get install -y coop-computing-tools python3-workqueue
# Usage: benches/core/run_all.sh            (from anywhere; ~10 min per round)
# Env: REPEAT (2), W1_N (10000), WQ_W1_N (W1_N), W2_N (400), W3_N (500),
#      OUT (results file, default benches/core/results-<date>.jsonl)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
REPEAT=${REPEAT:-2}
W1_N=${W1_N:-10000}
WQ_W1_N=${WQ_W1_N:-$W1_N}
W2_N=${W2_N:-400}
W3_N=${W3_N:-500}
OUT=${OUT:-$root/benches/core/results-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
PY=/usr/bin/python3 # Debian's, which has `import work_queue`

"$PY" -c 'import work_queue' || { echo "need python3-workqueue (apt)" >&2; exit 1; }
command -v work_queue_worker >/dev/null || { echo "need coop-computing-tools (apt)" >&2; exit 1; }

# Build first, so no compilation runs while anything is timed.
cargo build --release --bin drover
cargo bench --bench workloads --no-run

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
input=$tmp/input-50MB
head -c $((50 * 1024 * 1024)) /dev/urandom >"$input"
: >"$OUT"
cmds=$tmp/true-cmds
for _ in $(seq "$W1_N"); do echo true; done >"$cmds"

emit() { echo "$1" | tee -a "$OUT"; }

xargs_run() { # name, then the xargs command reading N lines of "true"
    local name=$1; shift
    local t0 t1
    t0=$(date +%s.%N)
    "$@" <"$cmds"
    t1=$(date +%s.%N)
    emit "$("$PY" -c "import json,sys; w=$t1-$t0; n=$W1_N; print(json.dumps({'system':'$name','workload':'W1','n':n,'wall_s':round(w,4),'tasks_per_s':round(n/w,2),'round':$round}))")"
}

for round in $(seq "$REPEAT"); do
    emit "{\"round\": $round, \"loadavg_start\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
    # The same command drover runs (each task is `/bin/sh -c true`), and /bin/true exec'd directly.
    xargs_run xargs-sh xargs -P 2 -I{} sh -c {}
    xargs_run xargs-exec xargs -P 2 -n 1 true
    cargo bench -q --bench workloads -- --w1-n "$W1_N" --w2-n "$W2_N" --w3-n "$W3_N" --w3-input "$input" \
        | sed "s/}\$/, \"round\": $round}/" | tee -a "$OUT"
    "$PY" benches/core/wq_workloads.py --w1-n "$WQ_W1_N" --w2-n "$W2_N" --w3-n "$W3_N" --w3-input "$input" \
        | sed "s/}\$/, \"round\": $round}/" | tee -a "$OUT"
    emit "{\"round\": $round, \"loadavg_end\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
done

"$PY" - "$OUT" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rounds = sorted({r["round"] for r in rows})
print("\nratios (results in %s)" % sys.argv[1])
for rd in rounds:
    get = {(r.get("system"), r.get("workload")): r for r in rows if r["round"] == rd and "system" in r}
    d = lambda w: get.get(("drover", w))
    q = lambda w: get.get(("workqueue-9.9", w))
    out = {"round": rd}
    if d("W1"):
        for x in ("xargs-sh", "xargs-exec"):
            if (x, "W1") in get:
                out["W1 drover/%s" % x] = round(d("W1")["tasks_per_s"] / get[(x, "W1")]["tasks_per_s"], 3)
    for w in ("W1", "W2", "W3"):
        if d(w) and q(w):
            out["%s drover/wq (rate)" % w] = round(d(w)["tasks_per_s"] / q(w)["tasks_per_s"], 2)
    if d("W2"):
        out["W2 drover wall/ideal"] = d("W2")["ratio_to_ideal"]
    if q("W2"):
        out["W2 wq wall/ideal"] = q("W2")["ratio_to_ideal"]
    if d("W3"):
        out["W3 drover transfers"] = d("W3")["input_transfers"]
        out["W3 drover files_sent"] = d("W3")["files_sent"]
        if "ratio_to_target" in d("W3"):
            out["W3 drover wall/target"] = d("W3")["ratio_to_target"]
    if q("W3"):
        out["W3 wq transfers"] = q("W3")["input_transfers"]
    print(json.dumps(out))
PYEOF
