"""`drover.monitored`: measure one function call in a child process."""

import functools
import os
import shutil
import sys
import tempfile

from ._drover import DroverError, monitor_run
from ._pytask import REMOTE_RUNNER, load_outcome, write_call


class ResourceExhausted(DroverError):
    """A monitored call went over one of its limits and was killed.
    ``exceeded`` says which limit and by how much; ``resources`` is what it used."""

    def __init__(self, message, exceeded, resources):
        super().__init__(message)
        self.exceeded = exceeded
        self.resources = resources


def monitored(limits=None, interval=0.1, python=None):
    """Decorator: each call runs in a child Python process under the drover
    monitor and returns ``(result, resources)``.

    ``resources`` is the monitor's summary (as from ``drover monitor``):
    ``memory`` (peak MB, where MB means MiB), ``cores``, ``cpu_time``,
    ``wall_time``, ``disk``, ``bytes_read``, ... ``limits`` is a dict of
    ``memory`` (MB), ``disk`` (MB), ``wall_time`` (s) and ``cores``; a call
    that goes over is killed and raises ResourceExhausted. An exception in
    the function is raised again here with the child's traceback as its
    cause. ``interval`` is the sampling period in seconds; ``python`` the
    interpreter to run (default this one). Arguments and the return value
    travel through files with cloudpickle.

    Usable bare (``@monitored``) or with arguments (``@monitored(limits={"memory": 500})``).
    """
    if callable(limits):
        return monitored()(limits)
    limits = dict(limits or {})

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            d = tempfile.mkdtemp(prefix="drover-monitored-")
            try:
                call = os.path.join(d, "call.pkl")
                out = os.path.join(d, "result.pkl")
                write_call(fn, args, kwargs, call)
                argv = [python or sys.executable, REMOTE_RUNNER, call, out]
                code, signal, exceeded, summary = monitor_run(argv, limits, interval, d)
                if exceeded is not None:
                    raise ResourceExhausted(
                        "%s went over its limit: %s" % (fn.__qualname__, exceeded), exceeded, summary)
                if not os.path.exists(out):
                    how = "exit code %s" % code if signal is None else "signal %s" % signal
                    raise DroverError("%s ended with %s and no result" % (fn.__qualname__, how))
                with open(out, "rb") as f:
                    data = f.read()
                return load_outcome(data), summary
            finally:
                shutil.rmtree(d, ignore_errors=True)

        return wrapper

    return decorate
