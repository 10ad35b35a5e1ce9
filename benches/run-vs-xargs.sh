#!/usr/bin/env bash
# W1 (lines of `true`) three ways in one script, alternating (issue 22):
#   xargs -P <cores> -n1 true          (the process start-up limit)
#   the drover-master library driving one `drover worker` (benches/workloads.rs, Task::cores(1))
#   drover run FILE                    (its own local worker)
# PAIRS rounds at N tasks (xargs library run, then run library xargs, ...), then each once at BIG_N.
# Each line also gives the CPU (user + system) of the whole process tree, which moves
# less than wall time on a shared machine.
#
#   benches/run-vs-xargs.sh [BIN_DIR]
#
# BIN_DIR holds `drover` and `workloads` (benches/collect-bins.sh makes one); without it the
# current checkout's release build is used. Env: N (10000), BIG_N (100000; 0 skips), PAIRS (3),
# OUT (results file, JSON lines), BASE (a second BIN_DIR, e.g. main's binaries: its library and
# drover run join each round as "library (base)" and "drover run (base)", for before/after),
# LIBRARY (0: leave the library out, and do not build it). A BIN_DIR or BASE without `workloads`
# runs without its library.
# Every worker runs without the Python function server (DROVER_FUNCTION_SERVER=0), as drover
# run's own workers do: W1 has no Python calls, and starting the interpreter held the worker
# back a quarter of a second, which the library's GNU time counted and drover run's did not.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
LIBRARY=${LIBRARY:-1}
if [ $# -ge 1 ]; then
    bins=$(cd "$1" && pwd)
    drover=$bins/drover
    workloads=$bins/workloads
elif [ "$LIBRARY" = 0 ]; then
    (cd "$root" && cargo build --release -q -p drover --bin drover)
    drover=$root/target/release/drover
    workloads=
else
    (cd "$root" && cargo build --release -q -p drover --bin drover --bench workloads)
    drover=$root/target/release/drover
    workloads=$(ls -t "$root"/target/release/deps/workloads-* | grep -v '\.d$' | head -1)
fi
[ "$LIBRARY" = 0 ] && workloads=
[ -n "$workloads" ] && [ ! -x "$workloads" ] && workloads=
N=${N:-10000}
BIG_N=${BIG_N:-100000}
PAIRS=${PAIRS:-3}
OUT=${OUT:-$root/benches/run-vs-xargs-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
BASE=${BASE:-}
[ -n "$BASE" ] && BASE=$(cd "$BASE" && pwd)
base_workloads=
[ -n "$BASE" ] && [ "$LIBRARY" != 0 ] && [ -x "$BASE/workloads" ] && base_workloads=$BASE/workloads
export DROVER_FUNCTION_SERVER=0
cores=$(nproc)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
: >"$OUT"

# One measured run: system n pair command...; wall and CPU of the tree (GNU time).
measure() {
    local system=$1 n=$2 pair=$3
    shift 3
    /usr/bin/time -f '%e %U %S' -o "$tmp/time" "$@" >/dev/null 2>"$tmp/err" || {
        cat "$tmp/err" >&2
        return 1
    }
    read -r wall user sys <"$tmp/time"
    python3 -c "import json; w=$wall; c=$user+$sys; print(json.dumps({'system':'$system','n':$n,'pair':$pair,'wall_s':w,'tasks_per_s':round($n/w,1),'cpu_s':round(c,2),'cpu_us_per_task':round(c*1e6/$n,1)}))" |
        tee -a "$OUT"
}

round() { # n pair
    local n=$1 pair=$2 f="$tmp/w1-$1.txt"
    [ -f "$f" ] || seq "$n" | sed "s/.*/true/" >"$f"
    local order=(xargs library run)
    [ -n "$BASE" ] && order=(xargs library-base run-base library run)
    # Systems whose binaries are missing sit out.
    local s kept=()
    for s in "${order[@]}"; do
        case $s in
        library) [ -n "$workloads" ] && kept+=("$s") ;;
        library-base) [ -n "$base_workloads" ] && kept+=("$s") ;;
        *) kept+=("$s") ;;
        esac
    done
    order=("${kept[@]}")
    [ $((pair % 2)) = 0 ] && order=($(printf '%s\n' "${order[@]}" | tac))
    for s in "${order[@]}"; do
        case $s in
        xargs) measure xargs "$n" "$pair" sh -c "xargs -P $cores -n 1 true <$f" ;;
        # The library's own clock starts at the first submit; GNU time's includes its
        # start-up, as it does drover run's.
        library) measure library "$n" "$pair" env DROVER_BIN="$drover" "$workloads" --workloads W1 --w1-n "$n" ;;
        run) measure "drover run" "$n" "$pair" sh -c "cd $tmp && '$drover' run '$f' --failed-dir '$tmp/failed'" ;;
        library-base) measure "library (base)" "$n" "$pair" env DROVER_BIN="$BASE/drover" "$base_workloads" --workloads W1 --w1-n "$n" ;;
        run-base) measure "drover run (base)" "$n" "$pair" sh -c "cd $tmp && '$BASE/drover' run '$f' --failed-dir '$tmp/failed'" ;;
        esac
    done
}

for pair in $(seq "$PAIRS"); do
    round "$N" "$pair"
done
[ "$BIG_N" -gt 0 ] && round "$BIG_N" 1

python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| tasks | system | runs | tasks/s (median) | / xargs | CPU us/task (median) | CPU / xargs |")
print("|---:|---|---:|---:|---:|---:|---:|")
for n in sorted({r["n"] for r in rows}):
    med = lambda s, k: statistics.median([r[k] for r in rows if r["n"] == n and r["system"] == s])
    x = med("xargs", "tasks_per_s")
    xc = med("xargs", "cpu_us_per_task")
    for s in ("xargs", "library (base)", "drover run (base)", "library", "drover run"):
        k = sum(1 for r in rows if r["n"] == n and r["system"] == s)
        if k == 0:
            continue
        c = med(s, 'cpu_us_per_task')
        print(f"| {n} | {s} | {k} | {med(s, 'tasks_per_s'):.0f} | {med(s, 'tasks_per_s') / x:.2f} | {c:.0f} | {c / xc:.3f} |")
PY
