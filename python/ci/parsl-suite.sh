#!/usr/bin/env bash
# Parsl's config-agnostic test suite against a drover config, then the same
# against Parsl's own htex_local for comparison (both summaries are printed;
# `--durations=0` gives per-test times). Needs the drover package installed
# and DROVER_BIN (or `drover` on PATH). Parsl's conftest needs pytest 7.
#   python/ci/parsl-suite.sh [extra pytest args, e.g. -k test_python_apps]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python3 -m pip install -q "pytest>=7.4,<8" "parsl[monitoring]" pandas
parsl_dir=$(python3 -c 'import os, parsl; print(os.path.dirname(parsl.__file__))')
run() {
  (cd "$(mktemp -d)" && timeout 3600 python3 -m pytest "$parsl_dir/tests" --config "$1" \
     -k "not cleannet" -p no:cacheprovider -q --durations=10 "${@:2}")
}
status=0
run "$here/drover_config.py" "$@" || status=$?
if [ "${PARSL_SUITE_COMPARE:-0}" = 1 ]; then
  run "$parsl_dir/tests/configs/htex_local.py" "$@" || true
fi
exit $status
