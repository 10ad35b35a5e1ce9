"""Calls without memory limits run on the function server's long-lived call
runners: reused across calls, measured by differences, replaced when a call
kills its runner, with each call's environment and directory undone, and
killed over a memory limit."""

import os
import signal
import time

import pytest

import drover
from conftest import wait_all


def run_one(m, task, timeout=120):
    m.submit(task)
    (r,) = wait_all(m, timeout).values()
    return r


def pid():
    return os.getpid()


def exits_hard(code):
    os._exit(code)


def kills_itself():
    os.kill(os.getpid(), signal.SIGKILL)


def environment_and_directory():
    return os.environ.get("DROVER_RUNNER_PROBE"), os.getcwd(), os.getpid()


def changes_environment_and_directory():
    os.environ["DROVER_RUNNER_LEFTOVER"] = "1"
    os.chdir("/")
    return os.environ.get("DROVER_RUNNER_PROBE"), os.getpid()


def rss_then_touch(mb):
    """This process's resident set before touching `mb` MiB, MiB."""
    with open("/proc/self/status") as f:
        rss = [int(line.split()[1]) for line in f if line.startswith("VmRSS:")][0] / 1024
    block = bytearray(mb * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return rss, os.getpid()


def test_consecutive_calls_reuse_the_runners(manager):
    # Two slots: never more than two calls at once, so never more than two
    # runners unless one died.
    for _ in range(30):
        manager.submit(drover.PythonTask(pid))
    results = wait_all(manager).values()
    assert all(r.outcome == "success" for r in results), [(r.outcome, r.error) for r in results]
    pids = [r.output for r in results]
    assert len(pids) == 30
    assert len(set(pids)) <= 2, set(pids)


@pytest.mark.parametrize("ender", [lambda: exits_hard(3), kills_itself], ids=["os_exit", "sigkill"])
def test_a_call_that_ends_its_runner_fails_clearly_and_the_next_runs(one_slot, ender):
    before = run_one(one_slot, drover.PythonTask(pid)).output
    dead = run_one(one_slot, drover.PythonTask(ender).set_max_retries(0))
    assert dead.outcome != "success"
    assert "runner" in (dead.error or ""), (dead.outcome, dead.error)
    after = run_one(one_slot, drover.PythonTask(pid))
    assert after.outcome == "success", (after.outcome, after.error)
    assert after.output != before  # a new runner replaced the dead one


def test_environment_and_directory_of_one_call_do_not_leak(one_slot):
    first = run_one(one_slot, drover.PythonTask(environment_and_directory))
    assert first.outcome == "success", (first.outcome, first.error)
    probe, home, runner = first.output
    assert probe is None
    changed = run_one(one_slot, drover.PythonTask(changes_environment_and_directory)
                      .set_env("DROVER_RUNNER_PROBE", "set"))
    assert changed.output == ("set", runner)
    after = run_one(one_slot, drover.PythonTask(
        lambda: (environment_and_directory(), os.environ.get("DROVER_RUNNER_LEFTOVER"))))
    assert after.output == ((None, home, runner), None)


def test_a_runner_measures_each_calls_own_peak(one_slot):
    big = run_one(one_slot, drover.PythonTask(rss_then_touch, 300))
    assert big.outcome == "success", (big.outcome, big.error)
    rss, runner = big.output
    # The runner's whole resident set at its highest in the call: what it
    # held when the call started, plus the 300 MiB touched.
    used = rss + 300
    assert abs(big.measured["memory_mb"] - used) <= 0.05 * used, (big.measured, used)
    # The peak is reset per call: the next, small call on the same runner
    # does not inherit the big one's.
    small = run_one(one_slot, drover.PythonTask(pid))
    assert small.output == runner
    assert small.measured["memory_mb"] < 100, small.measured


def test_memory_an_earlier_call_freed_is_not_the_next_calls_peak(one_slot):
    first = run_one(one_slot, drover.PythonTask(pid))
    base = first.measured["memory_mb"]
    # A 20 MiB block freed makes glibc's default allocator serve the next
    # blocks under 20 MiB from its heap, where freeing keeps them resident.
    for mb in (20, 10):
        r = run_one(one_slot, drover.PythonTask(rss_then_touch, mb))
        assert r.outcome == "success", (r.outcome, r.error)
        assert r.output[1] == first.output, "the same runner served every call"
    small = run_one(one_slot, drover.PythonTask(pid))
    assert small.output == first.output
    assert small.measured["memory_mb"] < base + 5, (small.measured, base)


def test_a_call_over_its_memory_limit_on_a_runner_is_killed_and_the_runner_replaced(one_slot):
    runner = run_one(one_slot, drover.PythonTask(pid)).output
    big = run_one(one_slot, drover.PythonTask(rss_then_touch, 300).set_memory(100)
                  .set_max_retries(0), timeout=300)
    assert big.outcome == "resource_exhausted", (big.outcome, big.error)
    assert big.exhausted_resource == "memory"
    assert big.measured["memory_mb"] > 100, big.measured
    after = run_one(one_slot, drover.PythonTask(pid).set_memory(100))
    assert after.outcome == "success", (after.outcome, after.error)
    assert after.output != runner


def touch_and_hold(mb):
    rss_then_touch(mb)
    time.sleep(2)  # held, so that the server's sampling (every 10 ms) sees it
    return os.getpid()


def test_a_call_over_its_category_bucket_grows_in_place_on_its_runner(manager):
    manager.category("grower", mode="bucketing", first={"memory": 100}, max={"memory": 1000})
    r = run_one(manager, drover.PythonTask(touch_and_hold, 300).set_category("grower"), 300)
    assert r.outcome == "success", (r.outcome, r.error, r.attempts)
    # Stopped over its 100 MB and let go on with more: one attempt.
    assert len(r.attempts) == 1, r.attempts
    assert r.allocated["memory_mb"] > 300
    assert r.measured["memory_mb"] >= 300


def records_pid_then_sleeps(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def test_a_cancelled_call_ends_its_runner_and_the_next_call_runs(one_slot, tmp_path):
    pidfile = tmp_path / "pid"
    tid = one_slot.submit(drover.PythonTask(records_pid_then_sleeps, str(pidfile)))
    deadline = time.monotonic() + 120
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    runner = int(pidfile.read_text())
    one_slot.cancel(tid)
    (r,) = wait_all(one_slot).values()
    assert r.outcome == "cancelled", (r.outcome, r.error)
    after = run_one(one_slot, drover.PythonTask(pid))
    assert after.outcome == "success", (after.outcome, after.error)
    assert after.output != runner
    with pytest.raises(ProcessLookupError):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            os.kill(runner, 0)  # reaped by the server, so gone, not a zombie
            time.sleep(0.05)


def logs_then_maybe_dies(path, i):
    with open(path, "a") as f:
        f.write("%d\n" % i)
    if i % 20 == 7:
        os._exit(5)
    return i


def test_runners_dying_among_many_calls_lose_none_and_run_none_twice(manager, tmp_path):
    log = tmp_path / "log"
    ids = {manager.submit(drover.PythonTask(logs_then_maybe_dies, str(log), i).set_max_retries(0)): i
           for i in range(200)}
    results = wait_all(manager, 300)
    assert sorted(ids) == sorted(results)
    for tid, r in results.items():
        i = ids[tid]
        if i % 20 == 7:
            assert r.outcome != "success" and "runner" in (r.error or ""), (i, r.outcome, r.error)
        else:
            assert (r.outcome, r.output) == ("success", i), (i, r.outcome, r.error)
    ran = sorted(int(x) for x in log.read_text().split())
    assert ran == list(range(200))  # each call ran exactly once
