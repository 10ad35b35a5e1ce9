import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import traceback

import pytest

import drover
from conftest import wait_all


def test_command_task_with_files(manager, tmp_path):
    src = tmp_path / "words.txt"
    src.write_text("a b c\nd e\n")
    out = tmp_path / "count.txt"
    t = drover.Task("wc -w < words.txt > count.txt; cat extra.txt; echo \"$GREETING\" >&2",
                    inputs=[str(src)], outputs=[(str(out), "count.txt")],
                    buffers={"extra.txt": b"from a buffer"}, env={"GREETING": "hello"},
                    cores=1, memory=100, tag="files")
    assert t.tag == "files" and t.resources["cores"] == 1
    tid = manager.submit(t)
    (r,) = wait_all(manager).values()
    assert r.id == tid
    assert r.outcome == "success" and r.exit_code == 0 and r.succeeded
    assert out.read_text().strip() == "5"
    assert r.stdout == "from a buffer"
    assert r.stderr.strip() == "hello"
    assert r.output == r.stdout
    assert r.tag == "files" and r.host
    assert r.allocated["cores"] == 1
    assert r.finished >= r.submitted
    assert r.attempts and r.attempts[-1]["host"] == r.host
    assert "wall_time_s" in r.measured


def test_failed_command_and_chained_setters(manager):
    t = drover.Task("exit 3").set_cores(1).set_tag("f").set_priority(2).set_max_retries(0)
    manager.submit(t)
    (r,) = wait_all(manager).values()
    assert r.outcome == "failed" and r.exit_code == 3
    assert manager.stats.tasks_failed == 1


def test_bad_input_is_refused_at_submit(manager, tmp_path):
    with pytest.raises(FileNotFoundError):
        manager.submit(drover.Task("true", inputs=[str(tmp_path / "missing")]))
    with pytest.raises(ValueError):
        manager.submit(drover.Task("true", buffers={"../escape": b"x"}))
    with pytest.raises(ValueError):
        manager.submit(drover.Task(""))
    with pytest.raises(ValueError):
        drover.Task("true", inputs=[42])
    with pytest.raises(ValueError):
        drover.Task("true", wall_time=-1)
    with pytest.raises(TypeError):
        manager.submit("echo not a task")
    assert manager.empty()


def test_cancel_by_tag(manager):
    ids = [manager.submit(drover.Task("sleep 60", tag="slow", cores=2)) for _ in range(3)]
    assert manager.cancel_by_tag("slow") == 3
    results = wait_all(manager)
    assert sorted(results) == sorted(ids)
    assert {r.outcome for r in results.values()} == {"cancelled"}


def test_python_task_returns_numpy_array(manager):
    np = pytest.importorskip("numpy")

    def make(n, scale=1.0):
        import numpy
        return numpy.arange(n, dtype=numpy.float64) * scale

    t = drover.PythonTask(make, 300_000, scale=2.0)
    t.set_cores(1)
    manager.submit(t)
    (r,) = wait_all(manager).values()
    value = r.output
    assert isinstance(value, np.ndarray)
    assert value.shape == (300_000,) and value[-1] == 599_998.0
    assert r.task is t and t.output[10] == 20.0


def blob(n, seed):
    """`n` pseudo-random bytes, the same for the same seed on any machine."""
    import random

    return random.Random(seed).randbytes(n)


def test_a_result_too_big_for_a_report_frame_comes_back_whole(manager):
    """A result too big to go inline in the task's report (an 8 MB array
    broke the 8 MB frame before, and then failed the call) travels after the
    report as a body of its own, and comes back as for a small one."""
    np = pytest.importorskip("numpy")

    def make(n):
        import numpy
        return numpy.arange(n, dtype=numpy.float64)

    array = drover.PythonTask(make, 1_000_000).set_cores(1)
    raw = drover.PythonTask(blob, 20 << 20, 7).set_cores(1)
    manager.submit_many([array, raw])
    results = wait_all(manager, timeout=300)
    assert all(r.outcome == "success" for r in results.values()), [
        (r.outcome, r.error) for r in results.values()]
    value = array.output
    assert value.shape == (1_000_000,) and np.array_equal(value, np.arange(1_000_000, dtype=np.float64))
    assert raw.output == blob(20 << 20, 7)


def test_a_20_mb_result_through_the_executor():
    np = pytest.importorskip("numpy")

    def make(n):
        import numpy
        return numpy.full(n, 3, dtype=numpy.int64)

    with drover.Executor(local_workers=1, cores=2) as ex:
        array = ex.submit(make, (20 << 20) // 8)
        raw = ex.submit(blob, 20 << 20, 11)
        small = ex.submit(blob, 100, 11)
        assert raw.result(timeout=300) == blob(20 << 20, 11)
        got = array.result(timeout=300)
        assert got.nbytes == 20 << 20 and np.all(got == 3)
        assert small.result(timeout=300) == blob(100, 11)


def deep_failure(x):
    return {}[x]


def test_python_task_remote_exception(manager):
    manager.submit(drover.PythonTask(deep_failure, "missing-key"))
    (r,) = wait_all(manager).values()
    assert r.outcome == "function_failed" and r.exit_code == 0  # the call ran and raised
    with pytest.raises(KeyError) as info:
        r.output
    cause = info.value.__cause__
    assert isinstance(cause, drover.RemoteTraceback)
    assert "deep_failure" in cause.tb and "Remote traceback" in str(cause)
    text = "".join(traceback.format_exception(info.type, info.value, info.tb))
    assert "deep_failure" in text and "Remote traceback" in text


def test_python_task_in_a_fresh_interpreter(tmp_path):
    """Without a function server each call runs the worker's `remote-PID.py`
    in a new interpreter."""
    with drover.Manager(port=0) as m:
        m.local_workers(1, cores=1, fast_python=False)
        ok = m.submit(drover.PythonTask(pow, 3, 4))
        bad = m.submit(drover.PythonTask(deep_failure, "k"))
        results = wait_all(m)
    assert results[ok].output == 81
    with pytest.raises(KeyError) as info:
        results[bad].output
    # The runner the worker wrote for calls in their own interpreter, not
    # its function server's copy.
    assert re.search(r"/remote-\d+\.py", info.value.__cause__.tb), info.value.__cause__.tb


def test_unpicklable_exception_becomes_remote_error(manager):
    def raise_local_class():
        class Local(Exception):
            def __reduce__(self):
                raise TypeError("no pickling")
        raise Local("odd")

    manager.submit(drover.PythonTask(raise_local_class))
    (r,) = wait_all(manager).values()
    with pytest.raises(drover.RemoteError, match="odd"):
        r.output


def test_python_task_killed_gives_task_failed(manager):
    import time

    t = drover.PythonTask(time.sleep, 600).set_wall_time(1).set_cores(1)
    manager.submit(t)
    (r,) = wait_all(manager).values()
    assert r.outcome == "wall_time_exceeded"
    with pytest.raises(drover.TaskFailed, match="wall_time_exceeded"):
        r.output


def test_ctrl_c_during_wait_raises_keyboard_interrupt(tmp_path):
    script = tmp_path / "waiter.py"
    script.write_text(textwrap.dedent("""
        import sys, drover
        m = drover.Manager(port=0)
        m.submit(drover.Task("sleep 600"))  # no worker: never finishes
        print("waiting", flush=True)
        try:
            m.wait()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(7)
        sys.exit(1)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "waiting"
        # Not a timing assertion: only gives the child time to enter wait()
        # after its print, so the signal lands inside wait.
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 7 and "interrupted" in out


def test_missing_binary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DROVER_BIN", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="DROVER_BIN"):
        drover.find_drover()


def test_categories(manager):
    manager.category("small", mode="max", max={"cores": 1, "memory": 500})
    for _ in range(3):
        manager.submit(drover.Task("true", category="small"))
    results = wait_all(manager)
    assert all(r.category == "small" and r.succeeded for r in results.values())
    assert all(r.allocated["memory_mb"] <= 500 for r in results.values())
    st = manager.category_stats("small")
    assert st["name"] == "small" and st["config"]["mode"] == "max"
    assert "small" in [c["name"] for c in manager.categories()]
    with pytest.raises(ValueError):
        manager.category("bad", mode="nonsense")
    with pytest.raises(ValueError):
        manager.category("bad", max={"ram": 1})
