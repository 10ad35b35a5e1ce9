#!/usr/bin/env bash
# The scale grid (issue 22): master CPU per task, RSS per queued task,
# dispatch rate and lost/duplicated tasks at 10k / 100k / 1M tasks and
# 10 / 100 / 1,000 workers (4 simulator processes), for each variant.
# Prints a markdown table. Usage: benches/scale/run.sh [variants...]
# (default: plain categories cached). SCALE_TASKS / SCALE_WORKERS override
# the grid, e.g. SCALE_TASKS="10000 100000" to skip the 1M points; SCALE_BIN
# runs a bench binary built earlier (benches/collect-bins.sh) instead of building.
set -euo pipefail
cd "$(dirname "$0")/../.."
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(plain categories cached)
tasks=(${SCALE_TASKS:-10000 100000 1000000})
workers=(${SCALE_WORKERS:-10 100 1000})
procs=${SCALE_PROCS:-4}

bin=${SCALE_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -q -p drover-master --bench scale
  bin=$(ls -t target/release/deps/scale-* | grep -v '\.d$' | head -1)
fi

field() { sed -n "s/.*\"$1\":\"\{0,1\}\([^,\"}]*\).*/\1/p"; }

echo "| variant | tasks | workers | master CPU us/task | RSS bytes/queued task | dispatch tasks/s | lost | duplicated |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for v in "${variants[@]}"; do
  for n in "${tasks[@]}"; do
    for w in "${workers[@]}"; do
      line=$(timeout 900 "$bin" --tasks "$n" --workers "$w" --procs "$procs" --variant "$v" | tail -1)
      echo "| $v | $n | $w | $(echo "$line" | field master_cpu_us_per_task) | $(echo "$line" | field master_bytes_per_queued_task) | $(echo "$line" | field dispatch_per_s) | $(echo "$line" | field lost) | $(echo "$line" | field duplicated) |"
      echo "$line" >> "${SCALE_LOG:-/dev/null}"
    done
  done
done
