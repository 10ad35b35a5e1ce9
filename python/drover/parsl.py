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

import concurrent.futures
import threading

from parsl.executors.base import ParslExecutor

from . import Manager, PythonTask

_SPEC_KEYS = {"cores", "memory", "disk", "gpus", "running_time_min", "priority"}


class DroverExecutor(ParslExecutor):
    """Runs Parsl apps on drover workers.

    ``port``, ``name``, ``password_file`` and ``catalog`` configure the
    drover Manager (workers connect with ``drover worker HOST:PORT``).
    ``local_workers`` starts that many workers on this machine, each with
    ``worker_cores`` cores (binary from $DROVER_BIN or PATH).
    """

    def __init__(self, label="drover", port=0, name=None, password_file=None, catalog=None,
                 local_workers=0, worker_cores=1, worker_memory=None, default_cores=1):
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
        self.manager = None
        self._futures = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self.manager = Manager(port=self.port, name=self.name,
                               password_file=self.password_file, catalog=self.catalog)
        if self.local_workers:
            self.manager.local_workers(self.local_workers, cores=self.worker_cores,
                                       memory=self.worker_memory)
        self._thread = threading.Thread(target=self._collect, name="drover-parsl-wait", daemon=True)
        self._thread.start()

    def submit(self, func, resource_specification, *args, **kwargs):
        if self.manager is None:
            raise RuntimeError("DroverExecutor.submit before start")
        spec = dict(resource_specification or {})
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ValueError("DroverExecutor does not know the resource(s) %s; it takes %s"
                             % (sorted(unknown), sorted(_SPEC_KEYS)))
        task = PythonTask(func, *args, **kwargs)
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
        future = concurrent.futures.Future()
        # The lock makes sure the collector finds the future even when the
        # task finishes before submit returns.
        with self._lock:
            tid = self.manager.submit(task)
            self._futures[tid] = future
        future.parsl_executor_task_id = tid
        return future

    def _collect(self):
        while not self._stop.is_set():
            r = self.manager.wait(0.5)
            if r is None:
                continue
            with self._lock:
                future = self._futures.pop(r.id, None)
            if future is None:
                continue
            try:
                future.set_result(r.output)
            except BaseException as e:  # the app's own exception, or TaskFailed
                future.set_exception(e)

    def shutdown(self, block=True):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.manager is not None:
            self.manager.shutdown()
        with self._lock:
            for f in self._futures.values():
                f.cancel()
            self._futures.clear()
        super().shutdown()

    def monitor_resources(self):
        return False
