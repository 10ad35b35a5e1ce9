"""Python calls through the worker's function server on real workers:
preloaded modules, measurement and limits (declared and by category),
output, outcomes, batches, futures, cleanup."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import drover
from conftest import wait_all


@pytest.fixture
def probe_module(tmp_path, monkeypatch):
    """A module on PYTHONPATH (so fork servers started from now on can import
    it) that records which process imported it."""
    d = tmp_path / "mods"
    d.mkdir()
    (d / "drover_probe_mod.py").write_text("import os\nLOADED_IN = os.getpid()\n")
    monkeypatch.setenv("PYTHONPATH", str(d) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.syspath_prepend(str(d))
    import drover_probe_mod

    yield drover_probe_mod
    sys.modules.pop("drover_probe_mod", None)


def loaded_where():
    import drover_probe_mod

    return drover_probe_mod.LOADED_IN, os.getpid(), os.getppid()


def uses_probe():
    return drover_probe_mod.LOADED_IN, os.getpid(), os.getppid()  # noqa: F821 (a global set below)


def test_fork_server_imports_the_callers_modules_once(probe_module):
    globals()["drover_probe_mod"] = probe_module
    try:
        assert "drover_probe_mod" in drover.PythonTask(uses_probe).modules
        with drover.Manager(port=0) as m:
            m.local_workers(1, cores=2)
            for _ in range(3):
                m.submit(drover.PythonTask(uses_probe))
            results = wait_all(m)
        seen = [r.output for r in results.values()]
        for loaded_in, pid, ppid in seen:
            # Imported by the server (the parent), not by the forked call.
            assert loaded_in == ppid and loaded_in != pid
        assert len({s[0] for s in seen}) == 1
    finally:
        globals().pop("drover_probe_mod", None)


def touch(mb):
    block = bytearray(mb * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(1.5)  # so that a sampling monitor sees the peak
    return len(block)


def shouts():
    print("from the function")
    print("to stderr", file=sys.stderr)
    return 7


def test_print_inside_a_function_is_the_tasks_stdout(manager):
    manager.submit(drover.PythonTask(shouts))
    (r,) = wait_all(manager).values()
    assert r.output == 7
    assert "from the function" in r.stdout
    assert "to stderr" in r.stderr


def touch_own(mb):
    """Touches `mb` MiB and holds it; returns this process's own peak RSS, MiB."""
    import resource

    touch(mb)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_call_over_its_memory_limit_is_killed_and_measured(manager):
    big = drover.PythonTask(touch_own, 300).set_memory(100).set_max_retries(0)
    manager.submit(big)
    fits = drover.PythonTask(touch_own, 300).set_memory(1000)
    manager.submit(fits)
    results = wait_all(manager, timeout=300)
    killed = [r for r in results.values() if r.task is big][0]
    ok = [r for r in results.values() if r.task is fits][0]
    assert killed.outcome == "resource_exhausted", (killed.outcome, killed.error)
    assert killed.exhausted_resource == "memory"
    assert ok.outcome == "success", (ok.outcome, ok.error, ok.stderr)
    own = ok.output
    # The forked call is the task's process: what the worker measured is
    # what the call itself used (its 300 MB and its share of the server's
    # pages), within 5%.
    assert own >= 300
    assert abs(ok.measured["memory_mb"] - own) <= 0.05 * own, (ok.measured["memory_mb"], own)


def test_a_call_over_its_category_bucket_is_retried_bigger(manager):
    manager.category("touchy", mode="bucketing", first={"memory": 100}, max={"memory": 1000},
                     grow_in_place=False)
    t = drover.PythonTask(touch_own, 300).set_category("touchy")
    manager.submit(t)
    (r,) = wait_all(manager, timeout=300).values()
    assert r.outcome == "success", (r.outcome, r.error, r.attempts)
    assert len(r.attempts) >= 2, r.attempts
    assert "memory" in r.attempts[0]["ending"], r.attempts
    assert r.attempts[0]["allocation"]["memory_mb"] == 100
    assert r.allocated["memory_mb"] > 300
    own = r.output
    assert abs(r.measured["memory_mb"] - own) <= 0.05 * own, (r.measured["memory_mb"], own)


def raises():
    raise KeyError("nope")


def test_a_function_that_raises_has_its_own_outcome(manager):
    manager.submit(drover.PythonTask(raises))
    manager.submit(drover.PythonTask(abs, -2))
    results = wait_all(manager)
    by_outcome = {r.outcome: r for r in results.values()}
    assert set(by_outcome) == {"function_failed", "success"}
    failed = by_outcome["function_failed"]
    assert not failed.succeeded
    with pytest.raises(KeyError, match="nope") as info:
        failed.output
    assert "raises" in str(info.value.__cause__)
    assert by_outcome["success"].output == 2


def test_wait_with_nothing_submitted_returns_at_once():
    with drover.Manager(port=0) as m:
        assert m.wait() is None
        assert m.wait(None) is None


def drover_tmp():
    import tempfile

    tmp = tempfile.gettempdir()
    return {p for p in os.listdir(tmp) if p.startswith("drover-py-")}


def test_calls_write_nothing_on_the_masters_side(manager):
    before = drover_tmp()
    small = drover.PythonTask(sum, [1, 2, 3])
    big = drover.PythonTask(len, b"x" * (2 << 20))  # over the inline limit: a file to the worker
    assert manager.submit_many([small, big])
    got = []
    while not manager.empty():
        got += manager.wait_many(10, 300)
    assert sorted(r.output for r in got) == [6, 2 << 20]
    assert drover_tmp() == before


def square(x):
    return x * x


def test_executor_futures():
    with drover.Executor(local_workers=1, cores=2, memory=200) as ex:
        assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
        futures = [ex.submit(square, i) for i in range(10)]
        failing = ex.options(category="bad", cores=1).submit(raises)
        done = set(concurrent.futures.as_completed(futures + [failing], timeout=300))
        assert len(done) == 11
        assert sorted(f.result() for f in futures) == [i * i for i in range(10)]
        with pytest.raises(KeyError):
            failing.result()
        assert failing.drover_result.outcome == "function_failed"
        assert failing.drover_result.category == "bad"
        one = ex.submit(square, 12)
        done, not_done = concurrent.futures.wait([one], timeout=300)
        assert one in done and not not_done and one.result() == 144
        with pytest.raises(ValueError):
            ex.options(colour="red")


MASTER = textwrap.dedent("""
    import json, os, sys, time
    import drover

    def sleeper(path):
        import os, time
        with open(path, "w") as f:
            f.write("%d %d" % (os.getpid(), os.getppid()))
        time.sleep(600)

    m = drover.Manager(port=0)
    (w,) = m.local_workers(1, cores=1)
    path = sys.argv[1]
    m.submit(drover.PythonTask(sleeper, path))
    while not os.path.exists(path) or not open(path).read():
        time.sleep(0.1)
    call, server = map(int, open(path).read().split())
    print(json.dumps({"server": server, "call": call, "worker": w.pid}), flush=True)
    time.sleep(600)
""")


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_nothing_is_left_when_the_master_dies(tmp_path, sig):
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "pids")],
                         stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(p.stdout.readline())
        procs = [info["server"], info["call"], info["worker"]]
        assert all(alive(q) for q in procs)
        p.send_signal(sig)
        p.wait(60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(q) for q in procs):
            time.sleep(0.2)
        assert not [q for q in procs if alive(q)]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def records_pid_then_sleeps(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def test_a_killed_call_does_not_outlive_its_task(manager, tmp_path):
    pidfile = tmp_path / "pid"
    t = drover.PythonTask(records_pid_then_sleeps, str(pidfile)).set_wall_time(3).set_max_retries(0)
    manager.submit(t)
    (r,) = wait_all(manager, timeout=300).values()
    assert r.outcome == "wall_time_exceeded"
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 60
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)
