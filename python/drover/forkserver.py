"""A fork server that runs PythonTasks on a local worker without starting an
interpreter per task: ``python -m drover.forkserver REQUEST_FIFO [CLEANUP_DIR...]``.

`LocalWorker` starts one next to each worker it launches and exports
``DROVER_PY_FORKSERVER=REQUEST_FIFO`` to it. A PythonTask's command sees the
variable, makes a reply FIFO in its sandbox, writes one request line to the
request FIFO (under PIPE_BUF, so writes from concurrent tasks do not
interleave) and blocks reading its exit status from the reply FIFO.

A request line is ``SANDBOX<TAB>SHELL_PID<TAB>MODULES<TAB>REPLY``, where
REPLY is the path the exit status is written to (a pipe the shell holds,
through /proc, or a FIFO; default SANDBOX/.drover-reply). Before forking, the
server imports MODULES (comma-separated: the modules the call's function and
its globals came from, as seen at submit) into itself, once each, so a call
through Parsl's wrappers does not import Parsl again in every child.

The child is made part of the task as the worker sees it: it joins the
cgroup v2 group of the waiting shell (so the worker's monitor measures and
limits the call itself, and kills it with the task), and writes to the
shell's stdout and stderr (so ``print`` comes back as the task's output).
Where the shell has no cgroup v2 group of its own the worker measures only
the shell (`LocalWorker(fast_python=False)` then gives true measurements).

The server watches its parent (the master's Python): when that goes away,
by any signal, the server kills its process group (itself and every call
still running) after removing the CLEANUP_DIRs.
"""

import os
import shutil
import signal
import sys
import threading
import time

if __package__:
    from .remote import run
else:  # a copy of this file next to remote.py (a `drover worker`'s own server)
    from remote import run

_imported = set()


def _cgroup2_root():
    """Mount point of the cgroup v2 hierarchy, or None."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split(" ")[4]
    except OSError:
        pass
    return None


_CGROUP2 = _cgroup2_root()


def _join_cgroup_of(pid):
    """Moves this process into the cgroup v2 group of `pid`; False if it cannot."""
    if _CGROUP2 is None:
        return False
    try:
        with open("/proc/%d/cgroup" % pid) as f:
            for line in f:
                if line.startswith("0::"):
                    rel = line[3:].strip()
                    break
            else:
                return False
        if rel in ("", "/"):
            return False  # the shell has no group of its own: joining would measure nothing
        with open(os.path.join(_CGROUP2, rel.lstrip("/"), "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        return True
    except OSError:
        return False


def _take_outputs_of(pid):
    """Points this process's stdout and stderr at those of `pid`."""
    for fd in (1, 2):
        try:
            target = os.open("/proc/%d/fd/%d" % (pid, fd), os.O_WRONLY | os.O_APPEND)
        except OSError:
            continue
        os.dup2(target, fd)
        os.close(target)


def _follow(pid):
    """Exits this process once `pid` no longer exists."""
    while True:
        time.sleep(0.25)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass


def _child(sandbox, shell_pid, reply):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # so the call can wait for its own children
    if shell_pid > 0:
        # First, so that everything the call allocates is charged to the task.
        if not _join_cgroup_of(shell_pid):
            # Outside the task's group, killing the task would not reach the
            # call: it ends itself when the waiting shell is gone.
            threading.Thread(target=_follow, args=(shell_pid,), daemon=True).start()
        _take_outputs_of(shell_pid)
    status = 1
    try:
        os.chdir(sandbox)
        status = run("call.pkl", "result.pkl")
    except BaseException:
        import traceback

        traceback.print_exc()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    try:
        fd = os.open(reply or os.path.join(sandbox, ".drover-reply"), os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"%d\n" % status)
        os.close(fd)
    except OSError:
        pass  # the task was killed: nobody is listening
    os._exit(0)


def preload(modules):
    """Imports each named module into the server once; failures are ignored
    (the child imports what it needs itself)."""
    import importlib

    for name in modules:
        if not name or name in _imported:
            continue
        _imported.add(name)
        try:
            importlib.import_module(name)
        except BaseException:  # a module that cannot load here loads (or fails) in the child
            pass


def parse_request(line):
    """(sandbox, shell pid, modules, reply path or None) of one request line."""
    parts = line.split("\t")
    sandbox = parts[0].strip()
    pid = 0
    if len(parts) > 1:
        try:
            pid = int(parts[1])
        except ValueError:
            pid = 0
    modules = parts[2].strip().split(",") if len(parts) > 2 else []
    reply = parts[3].strip() if len(parts) > 3 else ""
    return sandbox, pid, modules, reply or None


def _watch_parent(cleanup):
    """Ends the server and its calls when the process that started it dies."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    for d in cleanup:
        shutil.rmtree(d, ignore_errors=True)
    os.killpg(0, signal.SIGKILL)


def serve(fifo, cleanup=()):
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    preload(["cloudpickle"])
    if os.getpgrp() == os.getpid():  # only a group leader may kill its whole group
        threading.Thread(target=_watch_parent, args=(list(cleanup),), daemon=True).start()

    # O_RDWR: the server is also a writer, so the FIFO never reports EOF.
    fd = os.open(fifo, os.O_RDWR)
    if os.environ.pop("DROVER_FORKSERVER_READY", None):
        # The worker that started this server waits for this line.
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            sandbox, pid, modules, reply = parse_request(line.decode("utf-8", "surrogateescape"))
            if not sandbox:
                continue
            preload(modules)
            if os.fork() == 0:
                _child(sandbox, pid, reply)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.stderr.write("usage: python -m drover.forkserver REQUEST_FIFO [CLEANUP_DIR...]\n")
        sys.exit(2)
    serve(sys.argv[1], sys.argv[2:])
