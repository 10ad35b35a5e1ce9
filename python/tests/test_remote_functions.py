"""A `drover worker` started on its own (as on a remote node, over TCP)
runs Python calls through the function server it starts itself."""

import os
import resource
import subprocess
import sys
import time

import pytest

import drover

from conftest import wait_all


def parent_cmdline():
    with open("/proc/%d/cmdline" % os.getppid(), "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def touch(mb):
    """Touches `mb` MiB; returns this process's own peak RSS in MiB."""
    b = bytearray(mb * 2**20)
    for i in range(0, len(b), 4096):
        b[i] = 1
    # Held a while: without a memory controller here, the worker samples
    # /proc, which would miss a peak shorter than its interval.
    time.sleep(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture
def remote(tmp_path, drover_bin):
    """A Manager and one `drover worker` process connected to it over TCP,
    started the way a user starts one on another node (no fork server given)."""
    m = drover.Manager(port=0)
    env = dict(os.environ, DROVER_PYTHON=sys.executable)
    env.pop("DROVER_PY_FORKSERVER", None)
    env.pop("DROVER_FUNCTION_SERVER", None)
    workdir = tmp_path / "worker"
    w = subprocess.Popen([drover_bin, "worker", "127.0.0.1:%d" % m.port, "--cores", "2",
                          "--memory", "2000", "--workdir", str(workdir), "--exit-on-disconnect"],
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        yield m, workdir
    finally:
        m.shutdown()
        try:
            w.wait(60)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


def test_a_remote_worker_forks_calls_from_its_own_server(remote):
    m, workdir = remote
    m.submit(drover.PythonTask(parent_cmdline))
    m.submit(drover.PythonTask(print, "hello from a forked call"))
    results = list(wait_all(m, timeout=300).values())
    by_fn = {r.task.fn: r for r in results}
    parent = by_fn[parent_cmdline].output
    assert "forkserver.py" in parent and str(workdir) in parent, parent
    assert "hello from a forked call" in by_fn[print].stdout


def test_a_remote_call_over_its_limit_is_killed_and_measured_alone(remote):
    m, _ = remote
    big = m.submit(drover.PythonTask(touch, 300).set_memory(100).set_max_retries(0))
    fits = m.submit(drover.PythonTask(touch, 300).set_memory(1000))
    results = wait_all(m, timeout=300)
    killed, ok = results[big], results[fits]
    assert killed.outcome == "resource_exhausted", (killed.outcome, killed.attempts)
    assert killed.exhausted_resource == "memory"
    assert ok.outcome == "success", (ok.outcome, ok.stderr)
    own = ok.output
    # The call's own peak (its 300 MB and its share of the forked
    # interpreter) is what the worker measured, within 5%: the forked call
    # is measured, not the waiting shell.
    assert own >= 300
    assert abs(ok.measured["memory_mb"] - own) <= 0.05 * own, (ok.measured["memory_mb"], own)


def blob(n, seed):
    import random

    return random.Random(seed).randbytes(n)


def test_a_20_mb_result_comes_back_from_a_remote_worker(remote):
    """A result over the report frame's inline limit comes back over TCP as
    a body of its own, through a PythonTask and through drover.Executor."""
    np = pytest.importorskip("numpy")
    m, _ = remote

    def make(n):
        import numpy
        return numpy.arange(n, dtype=numpy.int64)

    t = drover.PythonTask(make, (20 << 20) // 8)
    m.submit(t)
    (r,) = wait_all(m, timeout=300).values()
    assert r.outcome == "success", (r.outcome, r.error, r.stderr)
    assert np.array_equal(t.output, np.arange((20 << 20) // 8, dtype=np.int64))
    with drover.Executor(manager=m) as ex:
        assert ex.submit(blob, 20 << 20, 5).result(timeout=300) == blob(20 << 20, 5)


def test_the_server_goes_with_its_worker(remote):
    m, workdir = remote
    m.submit(drover.PythonTask(os.getpid))
    wait_all(m, timeout=300)
    m.shutdown()
    for _ in range(600):
        if not [p for p in os.listdir(workdir) if p.startswith("functions-")]:
            break
        time.sleep(0.1)
    assert not [p for p in os.listdir(workdir) if p.startswith("functions-")]
