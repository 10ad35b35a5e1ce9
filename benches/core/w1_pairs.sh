#!/usr/bin/env bash
# W1 paired with its peer: ROUNDS times, `xargs -P 2 sh -c true` and drover's
# W1 back to back on the same N, so that load from anything else on the
# machine hits both alike; prints each pair's ratio and the median.
# Usage: benches/core/w1_pairs.sh     Env: N (3000), ROUNDS (5)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
N=${N:-3000}
ROUNDS=${ROUNDS:-5}
cargo build -q --release --bin drover
cargo bench -q --bench workloads --no-run 2>/dev/null
bench=$(cargo bench -q --bench workloads --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="workloads" and m.get("executable"): print(m["executable"])' | tail -1)
ratios=()
for r in $(seq "$ROUNDS"); do
    t0=$(date +%s.%N)
    seq "$N" | xargs -P 2 -I{} sh -c true
    t1=$(date +%s.%N)
    xargs_rate=$(python3 -c "print(round($N / ($t1 - $t0), 1))")
    line=$("$bench" --workloads W1 --w1-n "$N" 2>/dev/null | grep '"W1"')
    drover_rate=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['tasks_per_s'])" "$line")
    ratio=$(python3 -c "print(round($drover_rate / $xargs_rate, 3))")
    ratios+=("$ratio")
    echo "{\"round\": $r, \"n\": $N, \"xargs_sh_tasks_per_s\": $xargs_rate, \"drover_tasks_per_s\": $drover_rate, \"ratio\": $ratio, \"loadavg\": \"$(cut -d' ' -f1 /proc/loadavg)\"}"
done
python3 -c "import statistics,sys; print('{\"median_ratio\": %s}' % statistics.median(map(float, sys.argv[1:])))" "${ratios[@]}"
