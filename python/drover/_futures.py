"""`concurrent.futures` on top of a Manager: `drover.Executor`, and the
result collector that the Parsl executor shares with it."""

import concurrent.futures
import threading
import time

from ._pytask import PythonTask


class Collector:
    """Completes one Future per submitted task from a thread that waits on
    the manager. `submit` and the thread share a lock, so a task that ends
    before `submit` returns still finds its future."""

    def __init__(self, manager, name="drover-futures"):
        self.manager = manager
        self._futures = {}
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, task, future=None):
        """Submits `task` and returns the Future its result completes."""
        future = future or concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._stop:
                raise RuntimeError("cannot submit after shutdown")
            tid = self.manager.submit(task)
            self._futures[tid] = future
            self._work.notify()
        future.drover_task_id = tid
        return future

    def submit_many(self, tasks):
        """Submits `tasks` in one crossing; returns their Futures in order."""
        futures = [concurrent.futures.Future() for _ in tasks]
        for f in futures:
            f.set_running_or_notify_cancel()
        with self._lock:
            if self._stop:
                raise RuntimeError("cannot submit after shutdown")
            try:
                ids = self.manager.submit_many(tasks)
            finally:
                # Those queued before a refused one still complete.
                self._work.notify()
            for tid, f in zip(ids, futures):
                self._futures[tid] = f
                f.drover_task_id = tid
        return futures

    def pending(self):
        with self._lock:
            return len(self._futures)

    def _run(self):
        while True:
            with self._lock:
                # Sleeps, rather than polls, while nothing is out.
                while not self._futures and not self._stop:
                    self._work.wait()
                if self._stop:
                    return
            # Many results per crossing: under load one wait hands back
            # every call that finished meanwhile.
            done = self.manager.wait_many(1024, 0.5)
            if not done:
                continue
            with self._lock:
                futures = [self._futures.pop(r.id, None) for r in done]
            for r, future in zip(done, futures):
                if future is None:
                    continue
                future.drover_result = r
                try:
                    value = r.output
                except BaseException as e:  # the function's own exception, or TaskFailed
                    future.set_exception(e)
                else:
                    future.set_result(value)

    def stop(self, wait=True):
        """Ends the thread (after every pending future is done when `wait`),
        and cancels what is left."""
        if wait:
            with self._lock:
                pending = list(self._futures.values())
            concurrent.futures.wait(pending)
        with self._lock:
            self._stop = True
            self._work.notify_all()
            left = list(self._futures.values())
            self._futures.clear()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        for f in left:
            if not f.done():
                f.set_exception(concurrent.futures.CancelledError())


_OPTIONS = ("cores", "memory", "disk", "gpus", "wall_time", "category", "tag", "priority",
            "max_retries")


def make_task(fn, args, kwargs, options):
    """A PythonTask for ``fn(*args, **kwargs)`` with per-call `options`."""
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ValueError("unknown option(s) %s; expected some of %s" % (sorted(unknown), list(_OPTIONS)))
    task = PythonTask(fn, *args, **kwargs)
    for key, value in options.items():
        if value is not None:
            getattr(task, "set_" + key)(value)
    return task


class Executor(concurrent.futures.Executor):
    """Python calls on drover workers as `concurrent.futures` Futures.

    ::

        with drover.Executor(local_workers=1, cores=2) as ex:
            print(list(ex.map(pow, [2, 3], [10, 10])))
            big = ex.options(memory=2000, category="big").submit(work, 10**8)
            for f in concurrent.futures.as_completed([big]):
                print(f.result())

    `manager` is an existing Manager to use (else one is made with
    `port`); `local_workers` starts that many workers here with `cores`
    cores each. Keyword `options` (cores, memory MB, disk MB, gpus,
    wall_time s, category, tag, priority, max_retries) apply to every call;
    `options(...)` gives a view of this executor with more of them. A
    future's ``drover_result`` is the drover Result (measurements, host).
    """

    def __init__(self, manager=None, local_workers=0, cores=1, port=0, **options):
        from . import Manager

        make_task(abs, (0,), {}, options)  # checks the option names now
        self._own = manager is None
        self.manager = manager if manager is not None else Manager(port=port)
        if local_workers:
            self.manager.local_workers(local_workers, cores=cores)
        self._options = options
        self._collector = Collector(self.manager)

    def options(self, **options):
        """This executor, with `options` added to every call submitted through the result."""
        view = object.__new__(_OptionsView)
        view._parent = self
        view._options = dict(self._options, **options)
        make_task(abs, (0,), {}, view._options)
        return view

    def submit(self, fn, /, *args, **kwargs):
        return self._collector.submit(make_task(fn, args, kwargs, self._options))

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """Like `concurrent.futures.Executor.map`; the calls are submitted
        in batches (one crossing into the master per batch)."""
        return _map(self._collector, fn, iterables, self._options, timeout)

    def shutdown(self, wait=True, *, cancel_futures=False):
        self._collector.stop(wait=wait and not cancel_futures)
        if self._own:
            self.manager.shutdown()


class _OptionsView(concurrent.futures.Executor):
    """An Executor's submit and map with other per-call options."""

    def submit(self, fn, /, *args, **kwargs):
        return self._parent._collector.submit(make_task(fn, args, kwargs, self._options))

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        return _map(self._parent._collector, fn, iterables, self._options, timeout)

    def shutdown(self, wait=True, *, cancel_futures=False):
        self._parent.shutdown(wait, cancel_futures=cancel_futures)


#: Calls per submit_many of Executor.map: the workers start on the first
#: batch while the next ones are pickled.
_MAP_BATCH = 256


def _map(collector, fn, iterables, options, timeout):
    end = None if timeout is None else time.monotonic() + timeout
    futures, batch = [], []
    for args in zip(*iterables):
        batch.append(make_task(fn, args, {}, options))
        if len(batch) >= _MAP_BATCH:
            futures += collector.submit_many(batch)
            batch = []
    if batch:
        futures += collector.submit_many(batch)

    def results():
        try:
            futures.reverse()
            while futures:
                f = futures.pop()
                yield f.result(None if end is None else end - time.monotonic())
        finally:
            for f in futures:
                f.cancel()

    return results()
