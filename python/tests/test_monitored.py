import os

import pytest

import drover

MB = 1024 * 1024


@drover.monitored(interval=0.05)
def allocate(mb):
    block = b"\x01" * (mb * MB)  # written, so every page is really resident
    return len(block)


def test_monitored_measures_200_mb():
    value, res = allocate(200)
    assert value == 200 * MB
    # The child is a Python interpreter too (~10-20 MB), so the peak is the
    # 200 MB block plus that; within 10%.
    assert 200 * 0.9 <= res["memory"] <= 200 * 1.1, res
    assert res["wall_time"] > 0 and res["cpu_time"] > 0


def test_monitored_small_function_uses_little():
    value, res = allocate(1)
    assert value == MB and res["memory"] < 100


def test_monitored_limit_kills_and_raises():
    limited = drover.monitored(limits={"memory": 100}, interval=0.05)(allocate.__wrapped__)
    with pytest.raises(drover.ResourceExhausted) as info:
        limited(400)
    assert info.value.resources["memory"] >= 100


def test_monitored_reraises():
    @drover.monitored
    def fails():
        raise ZeroDivisionError("nope")

    with pytest.raises(ZeroDivisionError):
        fails()


def test_monitored_bad_limit():
    with pytest.raises(ValueError, match="unknown limit"):
        drover.monitored(limits={"memroy": 1})(len)([1])


def test_monitored_calls_are_forked_from_a_function_server(capfd):
    """The same path as a PythonTask's call on a worker: a child forked from
    the function server, adopted by the monitor; its output comes back."""

    @drover.monitored
    def parent():
        print("from the call")
        with open("/proc/%d/cmdline" % os.getppid(), "rb") as f:
            return f.read().replace(b"\0", b" ").decode()

    first, res = parent()
    assert "forkserver.py" in first, first
    assert res["wall_time"] > 0
    again, _ = parent()
    assert again == first, "one server per interpreter, kept between calls"
    assert "from the call" in capfd.readouterr().out
