#!/usr/bin/env bash
# W1 paired with its peers: ROUNDS times, `xargs -P 2 true` (the program
# exec'd directly, as a drover worker now starts a plain command),
# `xargs -P 2 sh -c true` (through the shell, as drover started every task
# before) and drover's W1, back to back on the same N, so that load from
# anything else on the machine hits all alike; prints each round's ratios
# and the medians. The target is against `xargs -P 2 true`.
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
rate() { python3 -c "print(round($N / ($2 - $1), 1))"; }
ratios=()
ratios_sh=()
for r in $(seq "$ROUNDS"); do
    t0=$(date +%s.%N)
    seq "$N" | xargs -P 2 -I{} true
    t1=$(date +%s.%N)
    seq "$N" | xargs -P 2 -I{} sh -c true
    t2=$(date +%s.%N)
    exec_rate=$(rate "$t0" "$t1")
    sh_rate=$(rate "$t1" "$t2")
    line=$("$bench" --workloads W1 --w1-n "$N" 2>/dev/null | grep '"W1"')
    drover_rate=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['tasks_per_s'])" "$line")
    ratio=$(python3 -c "print(round($drover_rate / $exec_rate, 3))")
    ratio_sh=$(python3 -c "print(round($drover_rate / $sh_rate, 3))")
    ratios+=("$ratio")
    ratios_sh+=("$ratio_sh")
    echo "{\"round\": $r, \"n\": $N, \"xargs_exec_tasks_per_s\": $exec_rate, \"xargs_sh_tasks_per_s\": $sh_rate, \"drover_tasks_per_s\": $drover_rate, \"ratio\": $ratio, \"ratio_to_xargs_sh\": $ratio_sh, \"loadavg\": \"$(cut -d' ' -f1 /proc/loadavg)\"}"
done
median() { python3 -c "import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
echo "{\"median_ratio\": $(median "${ratios[@]}"), \"median_ratio_to_xargs_sh\": $(median "${ratios_sh[@]}")}"
