"""`drover.monitored`: measure one function call in a child process."""

import functools
import os
import shutil
import sys
import tempfile
import threading

import cloudpickle

from ._drover import DroverError, monitored_call
from ._pytask import load_outcome, modules_of, modules_of_values, ship_by_value, staging_dir


class ResourceExhausted(DroverError):
    """A monitored call went over one of its limits and was killed.
    ``exceeded`` says which limit and by how much; ``resources`` is what it used."""

    def __init__(self, message, exceeded, resources):
        super().__init__(message)
        self.exceeded = exceeded
        self.resources = resources


_server_dirs = {}
_server_dirs_lock = threading.Lock()


def _server_dir(python):
    """Where the function server of `python` keeps its files: one directory
    per interpreter, inside this process's staging directory (removed at
    exit, or by the reaper if this process is killed)."""
    with _server_dirs_lock:
        d = _server_dirs.get(python)
        if d is None:
            d = os.path.join(staging_dir(), "monitored-%d" % len(_server_dirs))
            os.makedirs(d, exist_ok=True)
            _server_dirs[python] = d
        return d


def _echo(data, stream):
    if data:
        try:
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()
        except (OSError, ValueError):  # a closed or unwritable stream
            pass


def monitored(limits=None, interval=0.1, python=None):
    """Decorator: each call runs in a child Python process under the drover
    monitor and returns ``(result, resources)``.

    The child is forked from a function server (the same one a ``drover
    worker`` keeps, started here once per interpreter, without a master),
    and the monitor adopts it as a worker does a ``PythonTask``'s call: a
    monitored call and a PythonTask are measured and limited the same way.

    ``resources`` is the monitor's summary (as from ``drover monitor``):
    ``memory`` (peak MB, where MB means MiB), ``cores``, ``cpu_time``,
    ``wall_time``, ``disk``, ``bytes_read``, ... ``limits`` is a dict of
    ``memory`` (MB), ``disk`` (MB), ``wall_time`` (s) and ``cores``; a call
    that goes over is killed and raises ResourceExhausted. An exception in
    the function is raised again here with the child's traceback as its
    cause. What the call prints is written to this process's ``sys.stdout``
    and ``sys.stderr`` when it ends. ``interval`` is the sampling period in
    seconds; ``python`` the interpreter to run (default this one; it needs
    cloudpickle). Arguments and the return value travel with cloudpickle;
    the call runs in a new empty directory, whose disk use is measured.

    Usable bare (``@monitored``) or with arguments (``@monitored(limits={"memory": 500})``).
    """
    if callable(limits):
        return monitored()(limits)
    limits = dict(limits or {})

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            ship_by_value(fn)
            payload = cloudpickle.dumps((fn, args, kwargs))
            modules = modules_of(fn) + modules_of_values(args, kwargs)
            interpreter = python or sys.executable
            d = tempfile.mkdtemp(prefix="drover-monitored-")
            try:
                raised, data, out, err, code, signal, exceeded, summary = monitored_call(
                    payload, modules, interpreter, _server_dir(interpreter), d, limits, interval)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            _echo(out, sys.stdout)
            _echo(err, sys.stderr)
            if exceeded is not None:
                raise ResourceExhausted(
                    "%s went over its limit: %s" % (fn.__qualname__, exceeded), exceeded, summary)
            if data is None:
                how = "exit code %s" % code if signal is None else "signal %s" % signal
                raise DroverError("%s ended with %s and no result" % (fn.__qualname__, how))
            return load_outcome(data), summary

        return wrapper

    return decorate
