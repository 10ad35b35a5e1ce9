"""Starting `drover worker` processes on this machine."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref

from . import _reaper


def find_drover(binary=None):
    """Path of the `drover` executable: `binary`, else $DROVER_BIN, else `drover` on PATH."""
    for candidate, origin in ((binary, "the binary argument"), (os.environ.get("DROVER_BIN"), "$DROVER_BIN")):
        if candidate:
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return os.path.abspath(candidate)
            raise FileNotFoundError("%s names %r, which is not an executable file" % (origin, candidate))
    found = shutil.which("drover")
    if found:
        return found
    raise FileNotFoundError(
        "cannot find the drover binary: put `drover` on PATH or set DROVER_BIN "
        "(e.g. `cargo build` and DROVER_BIN=target/debug/drover)"
    )


class LocalWorker:
    """A `drover worker` process on this machine, connected to `manager`
    (a Manager, or an address "HOST:PORT").

    The worker exits when its manager goes away; `stop()` (also called by
    `with`, by `Manager.shutdown` for workers from `Manager.local_workers`,
    and at interpreter exit) ends it sooner. Python tasks on it run with
    this interpreter (DROVER_PYTHON is set to `sys.executable`) unless
    `python` names another. With `fast_python` (the default) the worker
    keeps a function server (drover.forkserver, started by the worker
    itself as on any node) that forks each call instead of starting an
    interpreter; the worker measures and limits each forked call as its
    task's process. `fast_python=False` runs every call in a new interpreter.
    """

    def __init__(self, manager, cores=1, memory=None, disk=None, gpus=0, workdir=None,
                 password_file=None, idle_timeout=900, binary=None, python=None, log=None,
                 fast_python=True):
        if isinstance(manager, str):
            address = manager
        else:
            address = "127.0.0.1:%d" % manager.port
        self.address = address
        self.binary = find_drover(binary)
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="drover-localworker-")
        cmd = [self.binary, "worker", address, "--cores", str(int(cores)),
               "--workdir", str(self.workdir), "--idle-timeout", str(int(idle_timeout)),
               "--exit-on-disconnect"]
        if memory is not None:
            cmd += ["--memory", str(int(memory))]
        if disk is not None:
            cmd += ["--disk", str(int(disk))]
        if gpus:
            cmd += ["--gpus", str(int(gpus))]
        if password_file is not None:
            cmd += ["--password-file", str(password_file)]
        env = dict(os.environ)
        env["DROVER_PYTHON"] = python or sys.executable
        # The worker's own function server, not one that another worker
        # or this process exported.
        env.pop("DROVER_PY_FORKSERVER", None)
        if fast_python:
            env.pop("DROVER_FUNCTION_SERVER", None)
        else:
            env["DROVER_FUNCTION_SERVER"] = "0"
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            # Its own session: Ctrl-C in the terminal reaches the Python
            # program, which then shuts the manager down, and not the worker.
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=out, env=env, start_new_session=True)
        finally:
            if log:
                out.close()
        # Should this process die by a signal, the worker, its server and its
        # workdir still go.
        _reaper.watch(pid=self.process.pid, path=self.workdir if self._own_workdir else None)
        self._finalizer = weakref.finalize(self, LocalWorker._reap, self.process,
                                           self.workdir if self._own_workdir else None)

    @staticmethod
    def _reap(process, workdir):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        _reaper.forget(pid=process.pid, path=workdir)

    @property
    def pid(self):
        return self.process.pid

    def running(self):
        """True while the worker process is alive."""
        return self.process.poll() is None

    def stop(self):
        """Terminates the worker (SIGTERM, then SIGKILL after 5 s) and removes its workdir."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def __repr__(self):
        return "LocalWorker(pid=%d, %s)" % (self.process.pid, self.address)
