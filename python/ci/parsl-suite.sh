#!/usr/bin/env bash
# Parsl's config-agnostic test suite against a drover config, and with
# PARSL_SUITE_COMPARE=1 the same against Parsl's own htex_local (pass
# `--durations=0` for per-test times; python/ci/suite-compare.py compares the
# two per test, from JUnit files). Needs the drover package installed
# and DROVER_BIN (or `drover` on PATH). Parsl's conftest needs pytest 7.
#   python/ci/parsl-suite.sh [extra pytest args, e.g. -k test_python_apps]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# pytest 7 goes to a directory of its own, put first on PYTHONPATH for these
# runs only, so the rest of the machine keeps its pytest.
pt=${PARSL_SUITE_PYTEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/drover-parsl-suite-pytest7}
[ -d "$pt/pytest" ] || python3 -m pip install -q --target "$pt" "pytest>=7.4,<8"
python3 -m pip install -q "parsl[monitoring]" pandas
parsl_dir=$(python3 -c 'import os, parsl; print(os.path.dirname(parsl.__file__))')
run() {
  (cd "$(mktemp -d)" && PYTHONPATH="$pt${PYTHONPATH:+:$PYTHONPATH}" timeout 3600 \
     python3 -m pytest "$parsl_dir/tests" --config "$1" \
     -k "not cleannet${DESELECT:+ and $DESELECT}" -p no:cacheprovider -q --durations=10 "${@:2}")
}
# Deselected on drover, each for a reason that is not drover's to fix:
# - test_bad_stdout_file, test_bad_stderr_file: they expect /bad/dir to be
#   uncreatable, which it is not for root (they fail on htex_local here too);
# - test_resource (test_resource_spec.py) submits one app with {cores: 1, memory: 1} and one
#   with {cpus: 1, memory: 1, disk: 1}; when a call raises InvalidResourceSpecification it
#   asserts that the executor is an instance of HighThroughputExecutor, WorkQueueExecutor or
#   ThreadPoolExecutor, and any other exception fails it. Another executor passes only if both
#   calls return normally, i.e. if it ignores the unknown key `cpus` (issue 17 asks drover to
#   refuse it with InvalidResourceSpecification, as those three do: test_parsl.py
#   test_unknown_resource_is_refused) and runs the app under the 1 MB it declared (drover
#   enforces `memory`; a call measured over 1 MB ends resource_exhausted). Passing it would take
#   dropping unknown keys and declared limits silently, or a DroverExecutor posing as one of
#   the three classes: neither is honest, so it is deselected. Parsl marks the test issue_3620
#   ("do not work correctly on GlobusComputeExecutor"): it fails for an executor outside its
#   list upstream as well.
known="not test_bad_stdout_file and not test_bad_stderr_file and not test_resource_spec"
status=0
DESELECT="$known" run "$here/drover_config.py" "$@" || status=$?
if [ "${PARSL_SUITE_COMPARE:-0}" = 1 ]; then
  run "$parsl_dir/tests/configs/htex_local.py" "$@" || true
fi
exit $status
