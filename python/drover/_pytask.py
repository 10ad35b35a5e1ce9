"""Python function calls as drover tasks."""

import functools
import itertools
import os
import pickle
import shutil
import sys
import sysconfig
import tempfile
import threading
import types

import cloudpickle

from . import _reaper
from ._drover import DroverError, Task

#: The runner shipped to workers (pure Python, see remote.py).
REMOTE_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote.py")

_staging_lock = threading.Lock()
_staging_dir = None
_counter = itertools.count()


def staging_dir():
    """A per-process directory for call and result files, removed at exit."""
    global _staging_dir
    with _staging_lock:
        if _staging_dir is None:
            import atexit

            _staging_dir = tempfile.mkdtemp(prefix="drover-py-")
            atexit.register(shutil.rmtree, _staging_dir, True)
            # atexit does not run when a signal ends this process.
            _reaper.watch(path=_staging_dir)
        return _staging_dir


class TaskFailed(DroverError):
    """A Python task did not produce a result (it was killed, cancelled, or
    its interpreter failed). ``result`` is the TaskResult."""

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


class RemoteError(DroverError):
    """An exception raised remotely that could not be sent back as itself."""


class RemoteTraceback(Exception):
    """Set as ``__cause__`` of a re-raised remote exception; its message is the
    remote traceback, so Python prints it above the local one."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return "\n\nRemote traceback:\n" + self.tb


_system_dirs = None
_by_value = set()


def _system_paths():
    global _system_dirs
    if _system_dirs is None:
        paths = sysconfig.get_paths()
        dirs = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
        import site

        for d in (site.getsitepackages() if hasattr(site, "getsitepackages") else []):
            dirs.add(os.path.realpath(d))
        user = getattr(site, "getusersitepackages", lambda: None)()
        if user:
            dirs.add(os.path.realpath(user))
        _system_dirs = tuple(d + os.sep for d in dirs)
    return _system_dirs


def ship_by_value(fn):
    """Makes cloudpickle send the module of `fn` by value when that module is
    the user's own code (not installed), since a worker could not import it."""
    modname = getattr(fn, "__module__", None)
    if not modname or modname == "__main__":
        return
    top = modname.split(".")[0]
    if top in _by_value or top == "drover":
        return
    mod = sys.modules.get(top)
    path = getattr(mod, "__file__", None)
    if mod is None or path is None:
        return
    if os.path.realpath(path).startswith(_system_paths()) or top == "drover":
        return
    cloudpickle.register_pickle_by_value(mod)
    _by_value.add(top)


#: Calls whose pickle is at most this many bytes travel inside the task
#: message; larger ones travel as a file (the worker's side of the limit is
#: drover_protocol::INLINE_CALL_BYTES).
INLINE_LIMIT = 1 << 20

#: Most text of module names sent with one call.
_MAX_MODULES_TEXT = 3000


def _module_name(obj):
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if callable(obj):
        # A callable instance without a module of its own (a partial, say)
        # comes from its type's module.
        return getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None)
    return None


def modules_of(fn):
    """The installed modules `fn` comes from, as a worker's fork server should
    have them imported: the module of `fn` (and of what a
    functools.partial or a wrapper holds), of the modules and callables in
    its globals, and cloudpickle. Modules sent by value (the user's own) and
    ``__main__`` are left out: a worker could not import them."""
    seen = []
    names = set()

    def add(name):
        if not name or name in names or name in ("__main__", "builtins"):
            return
        top = name.split(".")[0]
        if top in _by_value or top == "drover" or sys.modules.get(name) is None:
            return
        names.add(name)
        seen.append(name)

    stack = [fn]
    visited = set()
    while stack and len(visited) < 64:
        obj = stack.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        add(_module_name(obj))
        if isinstance(obj, functools.partial):
            stack.append(obj.func)
            stack.extend(a for a in obj.args if callable(a))
            stack.extend(v for v in obj.keywords.values() if callable(v))
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None:
            stack.append(wrapped)
        glob = getattr(obj, "__globals__", None)
        code = getattr(obj, "__code__", None)
        if glob is not None and code is not None:
            for name in code.co_names:
                value = glob.get(name)
                if value is not None:
                    add(_module_name(value))
                    if callable(value) and getattr(value, "__module__", None) == getattr(obj, "__module__", 0):
                        stack.append(value)
        closure = getattr(obj, "__closure__", None) or ()
        for cell in closure:
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if callable(value):
                stack.append(value)
    add("cloudpickle")
    out, length = [], 0
    for name in seen:
        length += len(name) + 1
        if length > _MAX_MODULES_TEXT:
            break
        out.append(name)
    return out


def modules_of_values(args, kwargs):
    """The installed modules of the arguments' types (numpy for an array):
    unpickling an argument imports its module, which the fork server then
    has done once instead of every call."""
    out = []
    for value in itertools.chain(args, kwargs.values()):
        name = getattr(type(value), "__module__", None)
        if not name or name == "builtins":
            continue
        top = name.split(".")[0]
        if top in _by_value or top in ("__main__", "drover") or sys.modules.get(top) is None:
            continue
        if top not in out:
            out.append(top)
        if len(out) >= 8:
            break
    return out


def write_call(fn, args, kwargs, path):
    """Serializes the call to `path`."""
    ship_by_value(fn)
    with open(path, "wb") as f:
        cloudpickle.dump((fn, args, kwargs), f)


def load_outcome(data):
    """The function's value from a result file's bytes; raises its exception."""
    payload = pickle.loads(data)
    if payload[0] == "ok":
        return payload[1]
    _, exc, tb, name, message = payload
    if exc is None:
        raise RemoteError("%s: %s\n\nRemote traceback:\n%s" % (name, message, tb))
    exc.__cause__ = RemoteTraceback(tb)
    if hasattr(exc, "add_note"):
        exc.add_note("(raised on a drover worker; remote traceback above)")
    raise exc


class PythonTask(Task):
    """``fn(*args, **kwargs)`` as a task.

    The call is serialized with cloudpickle and travels inside the task
    message (as a file when over 1 MiB). The worker hands it to its function
    server, a persistent interpreter that has already imported the call's
    modules and forks one child per call; the worker's monitor measures and
    limits that child as the task's process, so set_memory and categories
    apply to the call itself. The return value (or exception), and what the
    call printed, come back with the task's report (a pickled value over
    1 MiB as a raw body after it, into memory): nothing is written to disk
    on either side for a small call. Where the worker has no function
    server (no cloudpickle in its ``$DROVER_PYTHON``, or a packaged
    environment) the call runs in a new interpreter instead.

    After ``Manager.wait`` returns the task's result, its ``output`` is the
    return value, or raises the remote exception with the remote traceback
    as its cause; a call that raised has outcome ``function_failed``. The
    worker's Python needs ``cloudpickle`` and whatever ``fn`` imports, but
    not drover.

    Resources and other options are set with the ``Task`` methods
    (``set_cores``, ``set_memory``, ``set_tag``, ...).
    """

    def __new__(cls, fn, *args, **kwargs):
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        return super().__new__(cls, "python call %s" % name)

    def __init__(self, fn, *args, **kwargs):
        if not callable(fn):
            raise TypeError("PythonTask needs a callable, got %r" % (fn,))
        self.fn = fn
        ship_by_value(fn)
        call = cloudpickle.dumps((fn, args, kwargs))
        #: Modules a worker's function server imports before forking this call.
        self.modules = modules = modules_of(fn) + modules_of_values(args, kwargs)
        self.set_function_call(call, modules)
        self._data = None
        self._result = None

    def _complete(self, result):
        """Takes the call's outcome in (called by Manager.wait)."""
        self._result = result
        self._data = result.call_result

    @property
    def raised(self):
        """True when the call ran and raised (its outcome is ``function_failed``)."""
        r = self._result
        return r is not None and r.outcome == "function_failed"

    @property
    def output(self):
        """The function's return value; raises its exception, or TaskFailed
        when there is no result (e.g. the task was killed or cancelled)."""
        r = self._result
        if r is None:
            raise DroverError("the task has not finished")
        if self._data is None:
            detail = r.error or r.stderr.strip()[-2000:] or ""
            raise TaskFailed(
                "python task %d ended %s (exit code %s) without a result%s"
                % (r.id, r.outcome, r.exit_code, (": " + detail) if detail else ""),
                r,
            )
        return load_outcome(self._data)

    def __repr__(self):
        return "PythonTask(%s)" % getattr(self.fn, "__qualname__", repr(self.fn))
