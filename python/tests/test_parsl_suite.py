"""A few files of Parsl's own test suite against a drover config (the
whole suite: python/ci/parsl-suite.sh). Parsl's conftest needs pytest 7,
which parsl-suite.sh installs in a directory of its own; without it this
test is skipped."""

import os
import pathlib
import subprocess
import sys

import pytest

parsl = pytest.importorskip("parsl")

PYTEST7 = os.environ.get("PARSL_SUITE_PYTEST_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "drover-parsl-suite-pytest7")
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "ci" / "drover_config.py"
#: Test modules (of Parsl's tests/ directory) to run; their conftest takes
#: --config only when the whole directory is named, so they are picked by -k.
MODULES = ["test_fibonacci_recursive", "test_outputs", "test_fail", "test_bash_apps",
           "test_staging_stdout", "test_resource_spec"]


@pytest.mark.skipif(not os.path.isdir(os.path.join(PYTEST7, "pytest")),
                    reason="no pytest 7 for Parsl's conftest (run python/ci/parsl-suite.sh once)")
def test_parsl_suite_subset(tmp_path):
    tests = pathlib.Path(parsl.__file__).parent / "tests"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PYTEST7, os.environ.get("PYTHONPATH")])))
    # Two of test_stdout's tests expect an unwritable /bad/dir, which root can
    # create; test_resource passes only for executors it names (HTEX, Work
    # Queue, threads) when InvalidResourceSpecification is raised (the full
    # reason is in python/ci/parsl-suite.sh).
    skip = ["cleannet", "test_bad_stdout_file", "test_bad_stderr_file", "test_resource"]
    select = "(%s) and not (%s)" % (" or ".join(MODULES), " or ".join(skip))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(tests), "--config", str(CONFIG), "-k", select],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    tail = p.stdout[-3000:] + p.stderr[-2000:]
    assert p.returncode == 0, tail
    assert " passed" in p.stdout and " failed" not in p.stdout, tail
