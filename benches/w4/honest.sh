#!/usr/bin/env bash
# W4, honest: drover's bucketing against an oracle outside drover and Work
# Queue's best mode, on W4 and four workloads of other shapes, in warmed,
# alternated pairs. See benches/README.md, "W4, honest".
#
# For every workload (benches/w4/workloads.py) and every pair:
#   * before every run, the worker's memory size is touched once (touch_mem),
#     so the VM's first-touch cost (~3 s/GB here) is not charged to whichever
#     run comes first;
#   * every system runs once, in order in odd pairs and in reverse in even ones
#     (oracle, drover..., WQ | WQ, ...drover, oracle), so drift cancels (ABBA);
#   * systems: the oracle (oracle.py: starts each task itself, knowing its
#     memory and cores, greedy in task order), drover in bucketing mode with
#     tasks declaring nothing and declaring their cores only (master/benches/
#     w4.rs driving a real `drover worker`), and Work Queue 9.9 (wq_w4.py): all
#     of WQ_MODES in the first pair, then only the one that was fastest there.
# Writes JSON lines to $OUT (one per run, with "pair" and "slot"), the timeline
# summaries (timeline.py) to ${OUT%.jsonl}-timeline.jsonl, the traces to
# ${OUT%.jsonl}.traces/, and prints the summary table (summarise.py).
#
# Needs: cc; python3; for Work Queue: apt-get install -y coop-computing-tools
# python3-workqueue (Debian's /usr/bin/python3 imports work_queue).
#
# Env (defaults): WORKLOADS (w4,modes3,tail,grow,cores) N (120) SEED (4)
#   PAIRS (5; or REPS) MEM_SCALE (1; multiplies every task's memory and the worker's)
#   WORKER_CORES (12) WORKER_MB (12000 x MEM_SCALE)
#   DROVER_MODES (bucketing,bucketing-cores; w4.rs modes, "" to skip drover)
#   WQ_MODES (fixed4000,fixedmax,max_throughput, without fixed4000 on a worker
#     under 12,000 MB; "" to skip Work Queue)  WQ_PAIRS (PAIRS; Work Queue
#     runs in the first WQ_PAIRS pairs only)
#   ORACLE_POLICY (firstfit; or fifo)  WARM (1)  TRACE (1)  SAMPLE_MS (200)
#   OOM_SCORE_ADJ (500, inherited by every run)  RUN_TIMEOUT (1800 s per run)  DROVER (a drover binary; built if unset)
#   W4_BENCH (the w4 bench executable; built if unset)  OUT (results file)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
here=benches/w4
WORKLOADS=${WORKLOADS:-w4,modes3,tail,grow,cores}
N=${N:-120}
SEED=${SEED:-4}
PAIRS=${PAIRS:-${REPS:-5}}
MEM_SCALE=${MEM_SCALE:-1}
WORKER_CORES=${WORKER_CORES:-12}
WORKER_MB=${WORKER_MB:-$(python3 -c "print(int(round(12000 * float('$MEM_SCALE'))))")}
DROVER_MODES=${DROVER_MODES-bucketing,bucketing-cores}
if [ "$WORKER_MB" -ge 12000 ]; then
    WQ_MODES=${WQ_MODES-fixed4000,fixedmax,max_throughput}
else
    WQ_MODES=${WQ_MODES-fixedmax,max_throughput}
fi
WQ_PAIRS=${WQ_PAIRS:-$PAIRS}
ORACLE_POLICY=${ORACLE_POLICY:-firstfit}
WARM=${WARM:-1}
TRACE=${TRACE:-1}
SAMPLE_MS=${SAMPLE_MS:-200}
RUN_TIMEOUT=${RUN_TIMEOUT:-1800}
OUT=${OUT:-$root/$here/results-honest-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
base=${OUT%.jsonl}
TIMELINES=$base-timeline.jsonl
TRACES=$base.traces
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A system that books no memory (bucketing-cores before issue 21's fix) can
# run the VM out of memory; everything started from here inherits this score,
# so the kernel's OOM killer takes these tasks before anyone else's processes.
echo "${OOM_SCORE_ADJ:-500}" >/proc/self/oom_score_adj 2>/dev/null || true

cc -O2 -pthread -o "$tmp/touch_mem" $here/touch_mem.c
touch=$tmp/touch_mem
if [ -n "$DROVER_MODES" ]; then
    if [ -z "${DROVER:-}" ]; then
        cargo build --release --bin drover
        DROVER=${CARGO_TARGET_DIR:-$root/target}/release/drover
    fi
    if [ -z "${W4_BENCH:-}" ]; then
        W4_BENCH=$(cargo bench -q -p drover-master --bench w4 --no-run --message-format=json |
            python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "w4" and m.get("executable"):
        print(m["executable"])')
    fi
    [ -x "$W4_BENCH" ] || { echo "honest.sh: no w4 bench executable ($W4_BENCH)" >&2; exit 1; }
fi
if [ -n "$WQ_MODES" ] && ! /usr/bin/python3 -c 'import work_queue' 2>/dev/null; then
    echo "honest.sh: Work Queue missing: apt-get install -y coop-computing-tools python3-workqueue (or WQ_MODES=)" >&2
    exit 1
fi
mkdir -p "$TRACES"
: >"$OUT"
: >"$TIMELINES"

# Adds the run's place in the script to the JSON line(s) on stdin.
tag() {
    python3 -c 'import json,sys
extra = json.loads(sys.argv[1])
for l in sys.stdin:
    if l.strip().startswith("{"):
        r = json.loads(l); r.update(extra); print(json.dumps(r))' "$1"
}

# run WORKLOAD TASKFILE PAIR SLOT SYSTEM MODE
run() {
    local w=$1 tasks=$2 pair=$3 slot=$4 sys=$5 mode=$6 prefix out rc=0
    prefix=$TRACES/$w-$sys-$mode-p$pair
    if [ "$WARM" = 1 ]; then
        "$touch" "$WORKER_MB" 0 >/dev/null
    fi
    local trace=()
    case $sys in
    oracle)
        [ "$TRACE" = 1 ] && trace=(--trace "$prefix" --sample-ms "$SAMPLE_MS")
        out=$(timeout "$RUN_TIMEOUT" python3 $here/oracle.py --tasks "$tasks" --touch "$touch" \
            --workload "$w" --cores "$WORKER_CORES" --memory-mb "$WORKER_MB" \
            --policy "$mode" "${trace[@]}") || rc=$?
        ;;
    drover)
        [ "$TRACE" = 1 ] && trace=(--trace "$prefix" --sample-ms "$SAMPLE_MS")
        out=$(timeout "$RUN_TIMEOUT" "$W4_BENCH" --tasks "$tasks" --touch "$touch" --drover "$DROVER" \
            --modes "$mode" --workload "$w" --cores "$WORKER_CORES" --memory-mb "$WORKER_MB" \
            "${trace[@]}") || rc=$?
        ;;
    wq)
        trace=()
        out=$(timeout "$RUN_TIMEOUT" /usr/bin/python3 $here/wq_w4.py --tasks "$tasks" --touch "$touch" \
            --modes "$mode" --workload "$w" --cores "$WORKER_CORES" --memory-mb "$WORKER_MB") || rc=$?
        ;;
    esac
    local extra="{\"pair\":$pair,\"slot\":$slot,\"worker_mb\":$WORKER_MB,\"worker_cores\":$WORKER_CORES,\"mem_scale\":$MEM_SCALE,\"seed\":$SEED}"
    if [ $rc -ne 0 ] || [ -z "$out" ]; then
        echo "honest.sh: $w $sys $mode pair $pair failed (exit $rc)" >&2
        echo "{\"system\":\"$sys\",\"workload\":\"$w\",\"mode\":\"$mode\",\"error\":\"exit $rc\"}" | tag "$extra" | tee -a "$OUT"
        return 0
    fi
    echo "$out" | tag "$extra" | tee -a "$OUT"
    if [ ${#trace[@]} -gt 0 ] && [ -f "$prefix.tasks.jsonl" ]; then
        python3 $here/timeline.py "$prefix" --worker-mb "$WORKER_MB" |
            tag "{\"workload\":\"$w\",\"system\":\"$sys\",\"mode\":\"$mode\",\"pair\":$pair}" >>"$TIMELINES"
    fi
}

IFS=, read -ra workloads <<<"$WORKLOADS"
IFS=, read -ra dmodes <<<"$DROVER_MODES"
IFS=, read -ra wqmodes <<<"$WQ_MODES"
for w in "${workloads[@]}"; do
    tasks=$tmp/$w.tasks
    python3 $here/workloads.py "$w" "$N" "$SEED" "$MEM_SCALE" >"$tasks"
    cp "$tasks" "$base.$w.tasks"
    wq_now=("${wqmodes[@]}")
    for ((p = 1; p <= PAIRS; p++)); do
        systems=("oracle:$ORACLE_POLICY")
        for m in "${dmodes[@]}"; do systems+=("drover:$m"); done
        if ((p <= WQ_PAIRS)); then
            for m in "${wq_now[@]}"; do systems+=("wq:$m"); done
        fi
        if ((p % 2 == 0)); then
            rev=()
            for ((i = ${#systems[@]} - 1; i >= 0; i--)); do rev+=("${systems[i]}"); done
            systems=("${rev[@]}")
        fi
        slot=0
        for s in "${systems[@]}"; do
            slot=$((slot + 1))
            run "$w" "$tasks" "$p" "$slot" "${s%%:*}" "${s#*:}"
        done
        # After the first pair, only Work Queue's fastest mode there goes on.
        if ((p == 1 && ${#wq_now[@]} > 1)); then
            best=$(python3 -c 'import json,sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if r.get("workload") == sys.argv[2] and r["system"].startswith("workqueue") and "wall_s" in r and not r.get("lost")]
print(min(rows, key=lambda r: r["wall_s"])["mode"] if rows else "")' "$OUT" "$w")
            if [ -n "$best" ]; then wq_now=("$best"); fi
        fi
    done
done
echo
python3 $here/summarise.py "$OUT" "$TIMELINES"
