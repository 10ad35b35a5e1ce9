"""A worker's function server that dies while it holds calls: the calls run
again (not lost, not duplicated, not the worker's fault), the worker starts
a new server, and a call that kills its server every time ends."""

import os
import signal
import time

import pytest

import drover

from conftest import wait_all


def children(pid):
    """Pids of the direct children of `pid` (every thread's)."""
    out = set()
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out.update(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return out


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def server_of(worker_pid, other_than=None, timeout=120):
    """The pid of the worker's function server (a child running
    forkserver.py), waiting for one that is not `other_than`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in children(worker_pid):
            if c != other_than and "forkserver.py" in cmdline(c):
                return c
        time.sleep(0.1)
    pytest.fail("worker %d has no function server after %s s" % (worker_pid, timeout))


def parent_cmdline():
    return cmdline(os.getppid())


def marks_then_sleeps(d, i):
    open(os.path.join(d, "started-%d-%d" % (i, os.getpid())), "w").close()
    time.sleep(2)
    return i


@pytest.fixture
def one_worker():
    m = drover.Manager(port=0)
    (w,) = m.local_workers(1, cores=2)
    yield m, w
    m.shutdown()


def test_calls_survive_their_function_server_being_killed(one_worker, tmp_path):
    m, w = one_worker
    old = server_of(w.pid)
    ids = [m.submit(drover.PythonTask(marks_then_sleeps, str(tmp_path), i)) for i in range(4)]
    deadline = time.monotonic() + 120
    while not [p for p in os.listdir(tmp_path) if p.startswith("started-")]:
        assert time.monotonic() < deadline, "no call started"
        time.sleep(0.05)
    os.kill(old, signal.SIGKILL)
    results = wait_all(m, timeout=300)
    # Nothing lost, nothing twice.
    assert sorted(results) == sorted(ids)
    assert all(r.outcome == "success" for r in results.values()), [
        (r.outcome, r.error, r.attempts) for r in results.values()]
    assert sorted(r.output for r in results.values()) == [0, 1, 2, 3]
    endings = [a["ending"] for r in results.values() for a in r.attempts]
    assert any("function server went away" in e for e in endings), endings
    assert not any("refused" in e for e in endings), endings
    # A new server, and calls are forked from it again.
    new = server_of(w.pid, other_than=old)
    assert new != old
    deadline = time.monotonic() + 120
    while True:
        t = drover.PythonTask(parent_cmdline)
        m.submit(t)
        wait_all(m, timeout=300)
        if "forkserver.py" in t.output or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # a call in the moment before the new server was ready
    assert "forkserver.py" in t.output, t.output


def kills_its_server():
    if "forkserver.py" not in cmdline(os.getppid()):
        raise RuntimeError("not forked from a function server")
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)


def test_a_call_that_kills_its_server_every_time_ends(one_worker):
    m, w = one_worker
    server_of(w.pid)
    t = drover.PythonTask(kills_its_server).set_max_retries(2)
    m.submit(t)
    (r,) = wait_all(m, timeout=300).values()
    # Each run kills the server; a run in the moment the worker is starting
    # a new one has its own interpreter, and raises.
    assert r.outcome in ("failed", "function_failed"), (r.outcome, r.error, r.attempts)
    assert len(r.attempts) <= 3, r.attempts
    if r.outcome == "failed":
        assert r.error.startswith("the function server went away"), r.error
    # The worker still runs calls.
    ok = drover.PythonTask(sum, [1, 2])
    m.submit(ok)
    wait_all(m, timeout=300)
    assert ok.output == 3
