#!/usr/bin/env bash
# Monitor overhead (poller CPU while watching BENCH_TASKS tasks of BENCH_PROCS
# processes each, at the default 1 s interval) and accuracy (measured vs true
# peak memory), drover's cgroup and /proc paths side by side with CCTools
# resource_monitor, in one run. Needs: apt-get install -y coop-computing-tools
# (for resource_monitor) and a C compiler (cc) for the test program.
# Env: BENCH_SECONDS (20), BENCH_TASKS (100), BENCH_PROCS (10), OUT (results file).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
OUT=${OUT:-$root/benches/monitor/results-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
command -v resource_monitor >/dev/null || echo "resource_monitor not found: its rows will be skipped" >&2
cargo bench -p drover-monitor --bench poller --no-run
echo "{\"loadavg_start\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}" | tee "$OUT"
cargo bench -q -p drover-monitor --bench poller | tee -a "$OUT"
echo "{\"loadavg_end\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}" | tee -a "$OUT"
