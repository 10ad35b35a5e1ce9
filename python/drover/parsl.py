"""A Parsl executor that runs apps as drover PythonTasks.

::

    import parsl
    from drover.parsl import DroverExecutor

    parsl.load(parsl.Config(executors=[DroverExecutor(port=9123, local_workers=1, worker_cores=2)]))

Both ``@python_app`` and ``@bash_app`` work: Parsl hands every app to the
executor as a Python callable, which runs on a worker in a PythonTask (so the
worker's Python needs cloudpickle, and Parsl for bash apps). An app's
``parsl_resource_specification`` keys ``cores``, ``memory`` (MB), ``disk``
(MB), ``gpus``, ``running_time_min`` and ``priority`` become the task's
resources, wall-time limit and priority.
"""

import functools
import os
import pickle
import threading
import weakref

import cloudpickle
from parsl.executors.base import ParslExecutor
from parsl.app.errors import wrap_error
from parsl.executors.errors import InvalidResourceSpecification

from . import Manager, PythonTask
from ._futures import Collector
from ._pytask import ship_by_value

_SPEC_KEYS = {"cores", "memory", "disk", "gpus", "running_time_min", "priority"}


def app_name(func):
    """The name of the app a Parsl-wrapped callable runs."""
    seen = 0
    while seen < 16:
        seen += 1
        if isinstance(func, functools.partial):
            func = func.func
            continue
        break
    return getattr(func, "__name__", None) or type(func).__name__


def _local_path(item):
    """The path of a Parsl File (or path string) when it names a local file, else None."""
    scheme = getattr(item, "scheme", "file")
    if scheme not in ("file", None, ""):
        return None
    path = getattr(item, "filepath", item)
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    return path if isinstance(path, str) and path else None


def stage_files(task, kwargs):
    """Adds a Parsl app's relative ``inputs``/``outputs`` Files and its
    ``stdout``/``stderr`` to `task`'s files, so that the app, which runs in
    the worker's sandbox, reads and writes them where the submitter sees
    them. Absolute paths are left alone (a shared file system serves them)."""
    for item in kwargs.get("inputs") or ():
        path = _local_path(item)
        if path and not os.path.isabs(path) and os.path.exists(path):
            task.add_input_file(os.path.abspath(path), path, False)
    wanted = [_local_path(item) for item in kwargs.get("outputs") or ()]
    for key in ("stdout", "stderr"):
        target = kwargs.get(key)
        if isinstance(target, (tuple, list)) and target:
            target = target[0]
        wanted.append(_local_path(target) if target is not None else None)
    made = set()
    for path in wanted:
        if path and not os.path.isabs(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            task.add_output_file(os.path.abspath(path), path)
            sub = os.path.dirname(os.path.normpath(path))
            if sub and sub not in made:
                # An empty file there makes the directory the app writes into.
                made.add(sub)
                task.add_input_buffer(b"", os.path.join(sub, ".drover-dir"))


#: The code of the wrapper Parsl puts around every python and bash app
#: (parsl.app.errors.wrap_error): it returns the app's exception as a
#: RemoteExceptionWrapper instead of raising it.
_WRAP_ERROR_CODE = wrap_error(abs).__code__


def unwrap_errors(func):
    """The app inside Parsl's ``wrap_error`` wrapper, else `func` itself.

    That wrapper is how HTEX carries an app's exception back as a value; a
    drover call carries it by itself (the function's own exception,
    re-raised by the future with the remote traceback as its cause, which
    Parsl's DataFlowKernel treats exactly as a wrapped one). Shipping the
    wrapper would also make every call import Parsl on the worker: its
    function server would then hold all of Parsl, and each call's fork
    would copy that much bigger process (about 3x the cost of a fork of a
    plain function server, measured)."""
    if getattr(func, "__code__", None) is _WRAP_ERROR_CODE:
        inner = getattr(func, "__wrapped__", None)
        if callable(inner):
            return inner
    return func


class PickledOnce:
    """Stands for a callable whose pickle was made once: pickling this
    copies those bytes, and unpickling them (on the worker, with pickle
    alone) gives back the callable itself. Parsl hands the executor the
    same wrapped function for every call of an app, and HTEX likewise
    pickles a callable once (it assumes callables do not change), so a
    call costs the pickling of its arguments only. ``__wrapped__`` lets
    PythonTask find the modules the callable needs."""

    __slots__ = ("__wrapped__", "data")

    def __init__(self, func, data=None):
        func = unwrap_errors(func)
        if data is None:
            ship_by_value(func)
            data = cloudpickle.dumps(func)
        self.__wrapped__ = func
        self.data = data

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)

    def __reduce__(self):
        return (pickle.loads, (self.data,))

    def __getattr__(self, name):
        # Its name is the callable's (a task's name shows the app).
        if name in ("__name__", "__qualname__"):
            return getattr(self.__wrapped__, name)
        raise AttributeError(name)

    def __repr__(self):
        return "PickledOnce(%r)" % (self.__wrapped__,)


class _PickleCache:
    """The pickle of each callable, kept while the callable lives (the
    cache holds only bytes, so it keeps no callable alive)."""

    def __init__(self):
        self._by_func = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, func):
        """A PickledOnce for `func`, or `func` itself when it cannot be cached."""
        try:
            with self._lock:
                data = self._by_func.get(func)
        except TypeError:  # not hashable or not weakly referable: pickled with each call
            return unwrap_errors(func)
        if data is not None:
            return PickledOnce(func, data)
        once = PickledOnce(func)
        with self._lock:
            self._by_func[func] = once.data
        return once


class DroverExecutor(ParslExecutor):
    """Runs Parsl apps on drover workers.

    ``port``, ``name``, ``password_file`` and ``catalog`` configure the
    drover Manager (workers connect with ``drover worker HOST:PORT``).
    ``local_workers`` starts that many workers on this machine, each with
    ``worker_cores`` cores (binary from $DROVER_BIN or PATH), running calls
    through a fork server that keeps Parsl imported. Each app is its own
    category (``parsl:NAME``) unless ``category`` names one for all.
    """

    def __init__(self, label="drover", port=0, name=None, password_file=None, catalog=None,
                 local_workers=0, worker_cores=1, worker_memory=None, default_cores=1,
                 category=None):
        super().__init__()
        self.label = label
        self.port = port
        self.name = name
        self.password_file = password_file
        self.catalog = catalog
        self.local_workers = local_workers
        self.worker_cores = worker_cores
        self.worker_memory = worker_memory
        self.default_cores = default_cores
        self.category = category
        self.manager = None
        self._collector = None
        self._pickled = _PickleCache()

    def start(self):
        self.manager = Manager(port=self.port, name=self.name,
                               password_file=self.password_file, catalog=self.catalog)
        if self.local_workers:
            self.manager.local_workers(self.local_workers, cores=self.worker_cores,
                                       memory=self.worker_memory)
        self._collector = Collector(self.manager, name="drover-parsl-wait")

    def submit(self, func, resource_specification, *args, **kwargs):
        if self.manager is None:
            raise RuntimeError("DroverExecutor.submit before start")
        spec = dict(resource_specification or {})
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise InvalidResourceSpecification(
                unknown, "DroverExecutor takes %s" % ", ".join(sorted(_SPEC_KEYS)))
        task = PythonTask(self._pickled.get(func), *args, **kwargs)
        if any(kwargs.get(k) for k in ("inputs", "outputs", "stdout", "stderr")):
            stage_files(task, kwargs)
        task.set_category(self.category or "parsl:" + app_name(func))
        task.set_cores(int(spec.get("cores", self.default_cores)))
        if "memory" in spec:
            task.set_memory(int(spec["memory"]))
        if "disk" in spec:
            task.set_disk(int(spec["disk"]))
        if "gpus" in spec:
            task.set_gpus(int(spec["gpus"]))
        if "running_time_min" in spec:
            task.set_wall_time(float(spec["running_time_min"]) * 60.0)
        if "priority" in spec:
            task.set_priority(int(spec["priority"]))
        future = self._collector.submit(task)
        future.parsl_executor_task_id = future.drover_task_id
        return future

    def shutdown(self, block=True):
        if self._collector is not None:
            self._collector.stop(wait=False)
        if self.manager is not None:
            self.manager.shutdown()
        super().shutdown()

    def monitor_resources(self):
        return False
