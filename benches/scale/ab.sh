#!/usr/bin/env bash
# The scale grid on two builds in one run (issue 22): each point runs the
# `before` and `after` bench binaries back to back, their order alternating
# from point to point, so each ratio is measured at the same time.
#   benches/scale/ab.sh BEFORE_SCALE_BIN AFTER_SCALE_BIN [variants...]
# SCALE_TASKS / SCALE_WORKERS / SCALE_PROCS / SCALE_LOG as for run.sh;
# SCALE_EDGES=1 runs only the corners and the centre (100k x 100).
set -euo pipefail
before=$1
after=$2
shift 2
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(plain categories cached)
tasks=(${SCALE_TASKS:-10000 100000 1000000})
workers=(${SCALE_WORKERS:-10 100 1000})
procs=${SCALE_PROCS:-4}
field() { sed -n "s/.*\"$1\":\"\{0,1\}\([^,\"}]*\).*/\1/p"; }
one() { # bin variant n w build
    local line
    line=$(timeout 900 "$1" --tasks "$3" --workers "$4" --procs "$procs" --variant "$2" | tail -1)
    echo "${line%\}},\"build\":\"$5\"}" >>"${SCALE_LOG:-/dev/null}"
    echo "$line"
}
echo "| variant | tasks | workers | master CPU us/task before → after (ratio) | RSS B/queued task after | dispatch tasks/s before → after | lost | duplicated |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
k=0
for v in "${variants[@]}"; do
  for n in "${tasks[@]}"; do
    for w in "${workers[@]}"; do
      if [ "${SCALE_EDGES:-0}" = 1 ]; then
        edge_n=$([ "$n" = "${tasks[0]}" ] || [ "$n" = "${tasks[-1]}" ] && echo 1 || echo 0)
        edge_w=$([ "$w" = "${workers[0]}" ] || [ "$w" = "${workers[-1]}" ] && echo 1 || echo 0)
        centre=$([ "$n" = 100000 ] && [ "$w" = 100 ] && echo 1 || echo 0)
        [ "$edge_n$edge_w" = 11 ] || [ "$centre" = 1 ] || continue
      fi
      k=$((k + 1))
      if [ $((k % 2)) = 1 ]; then
        b=$(one "$before" "$v" "$n" "$w" before); a=$(one "$after" "$v" "$n" "$w" after)
      else
        a=$(one "$after" "$v" "$n" "$w" after); b=$(one "$before" "$v" "$n" "$w" before)
      fi
      cb=$(echo "$b" | field master_cpu_us_per_task); ca=$(echo "$a" | field master_cpu_us_per_task)
      ratio=$(python3 -c "print(f'{$ca/$cb:.2f}')")
      lost=$(( $(echo "$b" | field lost) + $(echo "$a" | field lost) ))
      dup=$(( $(echo "$b" | field duplicated) + $(echo "$a" | field duplicated) ))
      echo "| $v | $n | $w | $cb → $ca ($ratio) | $(echo "$a" | field master_bytes_per_queued_task) | $(echo "$b" | field dispatch_per_s) → $(echo "$a" | field dispatch_per_s) | $lost | $dup |"
    done
  done
done
