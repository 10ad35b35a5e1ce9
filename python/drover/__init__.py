"""drover: resource-aware master/worker task scheduling, from Python.

A minimal program::

    import drover

    with drover.Manager(port=0) as m:
        m.local_workers(1, cores=2)          # or start `drover worker HOST:PORT` anywhere
        m.submit(drover.Task("echo hello", cores=1))
        m.submit(drover.PythonTask(pow, 2, 10))
        while not m.empty():
            r = m.wait(5)
            if r:
                print(r.id, r.outcome, r.output)

See README.md in the source tree for installation and the full tour.
"""

import threading

from ._drover import DroverError, Task, TaskResult, version
from ._drover import Manager as _Manager
from ._local import LocalWorker, find_drover
from ._pytask import PythonTask, RemoteError, RemoteTraceback, TaskFailed
from ._monitored import ResourceExhausted, monitored

__all__ = [
    "Manager", "Task", "PythonTask", "Result", "TaskResult", "Stats", "LocalWorker",
    "monitored", "DroverError", "TaskFailed", "RemoteError", "RemoteTraceback",
    "ResourceExhausted", "find_drover", "version", "Executor",
]


def _resources(d):
    """A resources dict with Work Queue-style keys as drover's Resources."""
    names = {"cores": "cores", "memory": "memory_mb", "memory_mb": "memory_mb",
             "disk": "disk_mb", "disk_mb": "disk_mb", "gpus": "gpus"}
    out = {"cores": 0, "memory_mb": 0, "disk_mb": 0, "gpus": 0}
    for k, v in d.items():
        if k not in names:
            raise ValueError("unknown resource %r (expected cores, memory, disk, gpus)" % (k,))
        out[names[k]] = int(v)
    return out


class Stats(dict):
    """The manager's counters: a dict whose keys also read as attributes
    (``stats.tasks_waiting``, ``stats["workers_connected"]``)."""

    __slots__ = ()

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Result:
    """A finished task, as returned by ``Manager.wait``.

    Every attribute of ``TaskResult`` (``id``, ``outcome``, ``exit_code``,
    ``stdout``, ``stderr``, ``measured``, ``attempts``, ``host``, ...) reads
    through. ``task`` is the object that was submitted, and ``output`` is,
    for a PythonTask, the function's return value (raising its exception),
    and for a command task its stdout.
    """

    __slots__ = ("result", "task")

    def __init__(self, result, task):
        self.result = result
        self.task = task

    def __getattr__(self, name):
        return getattr(self.result, name)

    @property
    def outcome(self):
        """The engine's outcome: for a PythonTask whose function raised,
        ``"function_failed"``."""
        return self.result.outcome

    @property
    def succeeded(self):
        return self.outcome == "success"

    @property
    def output(self):
        if isinstance(self.task, PythonTask):
            return self.task.output
        return self.result.stdout

    def __repr__(self):
        return "Result(id=%d, outcome=%r, exit_code=%r)" % (
            self.result.id, self.outcome, self.result.exit_code)


class Manager:
    """A drover master: queues tasks, accepts workers, hands back results.

    ``port=0`` picks a free port (read it back from ``port``). ``name`` is
    the project name workers and ``drover status`` find the master by
    through the ``catalog`` ("HOST:PORT", which needs a name).
    ``password_file`` makes workers prove they know its contents.
    ``tls_cert`` and ``tls_key`` (PEM files, ``drover tls init`` makes them)
    serve workers over TLS; workers then need ``--tls-ca`` or
    ``--tls-fingerprint``.

    Work Queue users will recognise the loop::

        while not m.empty():
            r = m.wait(5)

    ``wait`` releases the GIL and Ctrl-C interrupts it with KeyboardInterrupt.
    The manager is also a context manager: leaving the block shuts it down
    and stops the local workers it started.
    """

    def __init__(self, port=0, name=None, password_file=None, catalog=None, *,
                 bind="0.0.0.0", keepalive_interval=10.0, keepalive_timeout=60.0,
                 catalog_interval=15.0, tls_cert=None, tls_key=None):
        self._m = _Manager(port, name, password_file, catalog, bind, keepalive_interval,
                           keepalive_timeout, catalog_interval, tls_cert, tls_key)
        # Submitted objects by id, so wait() can hand them back; the lock keeps
        # a fast task's result from overtaking the insert of its own entry.
        self._tasks = {}
        self._lock = threading.Lock()
        self._local = []

    @property
    def port(self):
        """The port workers connect to."""
        return self._m.port

    @property
    def name(self):
        """The project name, if any."""
        return self._m.name

    def submit(self, task):
        """Queues a Task or PythonTask and returns its id. Input files are
        checked now: a missing one raises FileNotFoundError, a sandbox name
        that escapes the sandbox raises ValueError."""
        if not isinstance(task, Task):
            raise TypeError("submit takes a drover.Task or drover.PythonTask, not %r" % (task,))
        with self._lock:
            tid = self._m.submit(task)
            self._tasks[tid] = task
        return tid

    def submit_many(self, tasks):
        """Queues many Tasks or PythonTasks in one crossing into the master
        (the GIL released once) and returns their ids in order. A task that
        cannot be queued raises as `submit` would; those before it are
        queued."""
        tasks = list(tasks)
        for task in tasks:
            if not isinstance(task, Task):
                raise TypeError("submit_many takes drover.Task or drover.PythonTask objects, not %r"
                                % (task,))
        with self._lock:
            ids, error = self._m.submit_many(tasks)
            for tid, task in zip(ids, tasks):
                self._tasks[tid] = task
        if error is not None:
            raise error
        return ids

    def wait_many(self, max=1024, timeout=None):
        """Up to `max` finished tasks as Results: waits at most `timeout`
        seconds (None: for ever) for the first, then takes every other one
        already finished, in one crossing. An empty list when `timeout`
        passes first or nothing is queued or running."""
        if self._m.empty():
            return []
        got = self._m.wait_many(max, timeout)
        out = []
        with self._lock:
            tasks = [self._tasks.pop(r.id, None) for r in got]
        for r, task in zip(got, tasks):
            if isinstance(task, PythonTask):
                task._complete(r)
            out.append(Result(r, task))
        return out

    def wait(self, timeout=None):
        """The next finished task as a Result, or None when `timeout` seconds
        pass first (None or a negative timeout waits for ever), or None at
        once when nothing is queued or running."""
        if self._m.empty():
            return None
        r = self._m.wait(timeout)
        if r is None:
            return None
        with self._lock:
            task = self._tasks.pop(r.id, None)
        if isinstance(task, PythonTask):
            task._complete(r)
        return Result(r, task)

    def cancel(self, task_id):
        """Cancels a task by id; its result (outcome "cancelled") still comes
        out of `wait`. False if it is not queued or running."""
        return self._m.cancel(task_id)

    def cancel_by_tag(self, tag):
        """Cancels every queued or running task with this tag; returns how many."""
        return self._m.cancel_by_tag(tag)

    @property
    def stats(self):
        """Counts of tasks and workers, and resources in use (a Stats)."""
        return Stats(self._m.stats())

    def workers(self):
        """The connected workers: dicts of host, addr, resources, running."""
        return self._m.workers()

    def category(self, name, mode="bucketing", max=None, first=None, **options):
        """Configures the category `name` (tasks join it with `category=` or
        `set_category`). `mode` is "bucketing" (k-means buckets of measured
        peaks, the default), "max" (largest peak seen plus a margin) or
        "fixed" (what each task declares). `max` and `first` are dicts of
        cores, memory (MB), disk (MB), gpus: the most a task may get, and
        what it gets before anything has been measured. Other options:
        margin, min_samples, window, max_buckets, seed, grow_in_place (a task
        over its memory allocation is frozen and given more where it runs
        instead of being killed and retried; default True)."""
        config = dict(options, mode=mode)
        if max is not None:
            config["max"] = _resources(max)
        if first is not None:
            config["first"] = _resources(first)
        self._m.set_category(name, config)

    def category_stats(self, name):
        """What the category has learned (buckets, samples, next allocation), or None."""
        return self._m.category_stats(name)

    def categories(self):
        """Statistics of every category."""
        return self._m.categories()

    def empty(self):
        """True when every submitted task has come back from `wait`."""
        return self._m.empty()

    def hungry(self):
        """True when more tasks would keep the workers busy."""
        return self._m.hungry()

    def local_workers(self, n=1, cores=1, memory=None, disk=None, **kwargs):
        """Starts `n` `drover worker` processes on this machine, each offering
        `cores` cores (and `memory`/`disk` MB if given); they are stopped at
        shutdown. Finds the binary through $DROVER_BIN or PATH. Returns them."""
        started = [LocalWorker(self, cores=cores, memory=memory, disk=disk, **kwargs) for _ in range(n)]
        self._local.extend(started)
        return started

    def shutdown(self):
        """Stops listening, closes every worker connection and stops the local
        workers started here. Idempotent."""
        self._m.shutdown()
        for w in self._local:
            w.stop()
        self._local.clear()

    def shutdown_workers(self):
        """Tells every connected worker to exit, then shuts down."""
        self._m.shutdown_workers()
        self.shutdown()

    @property
    def closed(self):
        return self._m.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False

    def __repr__(self):
        return "Manager(port=%s, name=%r)" % ("closed" if self.closed else self.port, self.name)


from ._futures import Executor  # noqa: E402  (needs Manager above)
