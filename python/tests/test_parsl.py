"""A real Parsl DAG on real drover workers."""

import pytest

parsl = pytest.importorskip("parsl")
from parsl.app.app import bash_app, python_app  # noqa: E402

from drover.parsl import DroverExecutor  # noqa: E402


@python_app
def square(x, parsl_resource_specification={}):
    return x * x


@python_app
def total(*parts):
    return sum(parts)


@bash_app
def write(text, stdout=None, parsl_resource_specification={}):
    return "echo %s" % text


@pytest.fixture
def dfk(tmp_path):
    config = parsl.Config(
        executors=[DroverExecutor(local_workers=1, worker_cores=2)],
        run_dir=str(tmp_path / "runinfo"),
        strategy="none",
    )
    d = parsl.load(config)
    yield d
    parsl.dfk().cleanup()


def test_fan_out_fan_in_50_apps(dfk, tmp_path):
    spec = {"cores": 1, "memory": 200, "disk": 100}
    squares = [square(i, parsl_resource_specification=spec) for i in range(48)]
    fan_in = total(*squares)  # depends on all 48
    out = tmp_path / "echo.txt"
    echoed = write("fan-in-done", stdout=str(out), parsl_resource_specification=spec)
    assert fan_in.result(timeout=300) == sum(i * i for i in range(48))
    assert echoed.result(timeout=300) == 0
    assert out.read_text().strip() == "fan-in-done"
    ex = dfk.executors["drover"]
    assert ex.manager.stats.tasks_done == 50


def test_remote_exception_reaches_the_future(dfk):
    @python_app
    def fails():
        raise RuntimeError("from the worker")

    with pytest.raises(RuntimeError, match="from the worker"):
        fails().result(timeout=300)


def test_python_apps_run_without_parsl_on_the_worker(dfk):
    @python_app
    def parsl_imported_here():
        import sys

        return "parsl" in sys.modules

    # Parsl's error wrapper stays behind: the function server that forks the
    # call never imports Parsl, so each fork copies a small process.
    assert parsl_imported_here().result(timeout=300) is False


def test_unknown_resource_is_refused(dfk):
    from parsl.executors.errors import InvalidResourceSpecification

    with pytest.raises(InvalidResourceSpecification) as info:
        square(2, parsl_resource_specification={"cpus": 1}).result(timeout=300)
    assert info.value.invalid_keys == {"cpus"}


@bash_app
def make_files(inputs=(), outputs=(), stdout=None, stderr=None):
    return "cat %s > %s; echo out; echo err >&2" % (inputs[0].filepath, outputs[0].filepath)


def test_relative_files_and_std_streams_are_staged(dfk, tmp_path, monkeypatch):
    from parsl.data_provider.files import File

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("staged in\n")
    fut = make_files(inputs=[File("in.txt")], outputs=[File("sub/out.txt")],
                     stdout="std.out", stderr=("std.err", "w"))
    assert fut.result(timeout=300) == 0
    fut.outputs[0].result(timeout=300)
    assert (tmp_path / "sub" / "out.txt").read_text() == "staged in\n"
    assert (tmp_path / "std.out").read_text().strip() == "out"
    assert (tmp_path / "std.err").read_text().strip().endswith("err")  # after Parsl's own header


def test_each_app_is_its_own_category(dfk):
    assert square(3).result(timeout=300) == 9
    assert total(1, 2).result(timeout=300) == 3
    names = {c["name"] for c in dfk.executors["drover"].manager.categories()}
    assert {"parsl:square", "parsl:total"} <= names


def test_an_apps_function_is_pickled_once_per_executor():
    import pickle

    from drover.parsl import DroverExecutor, PickledOnce

    def scale(x, by=3):
        return x * by

    ex = DroverExecutor()
    first = ex._pickled.get(scale)
    assert isinstance(first, PickledOnce)
    assert ex._pickled.get(scale).data is first.data
    assert first.__qualname__ == scale.__qualname__
    # Unpickled with pickle alone (as on a worker), it is the function itself.
    back = pickle.loads(pickle.dumps(first))
    assert not isinstance(back, PickledOnce) and back(2) == 6
    # Parsl's wrap_error wrapper is left out; its app is what is shipped.
    from parsl.app.errors import wrap_error

    wrapped = wrap_error(scale)
    once = ex._pickled.get(wrapped)
    assert once.__wrapped__ is scale and pickle.loads(pickle.dumps(once))(2) == 6
    del wrapped, once
    # Callables that cannot be cached are passed through.
    unhashable = type("Unhashable", (), {"__call__": lambda self: 1, "__hash__": None})()
    assert ex._pickled.get(unhashable) is unhashable
    # The cache keeps no callable alive.
    import gc
    import weakref

    gone = weakref.ref(scale)
    del scale, first, back
    gc.collect()
    assert gone() is None
