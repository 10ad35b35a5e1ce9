"""Cleanup that survives the death of this process by any signal.

The first call of `watch` starts one small helper process per Python
process, in a session of its own (so a Ctrl-C meant for the program does
not reach it), reading a pipe that only this process writes. Each `watch`
sends it a directory to remove or a process to end. The pipe reaches end of
file when this process is gone however it went (normal exit, an uncaught
SIGTERM or SIGINT, SIGKILL, a crash); the helper then terminates the
processes (SIGKILL after a grace period), waits for them to go, removes the
directories, and exits. A normal exit has usually cleaned up already; then
the helper finds nothing left to do.

    python -S .../drover/_reaper.py    (reads its instructions on stdin; -S:
    it needs only the standard library, and starts faster without site)
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

_lock = threading.Lock()
_pipe = None
_helper = None
_owner = None

#: Seconds a watched process gets after SIGTERM before SIGKILL.
GRACE = 5.0


def watch(path=None, pid=None):
    """Has `path` (a directory) removed and/or `pid` (a process, with its
    process group when it leads one) ended once this process is gone. Never
    raises: cleanup is best effort, and a failure to arrange it must not
    fail the caller."""
    _send("", path, pid, start=True)


def forget(path=None, pid=None):
    """Tells the helper that `path` and `pid` were cleaned up already (so a
    reused pid is not signalled)."""
    _send("-", path, pid, start=False)


def _send(prefix, path, pid, start):
    global _pipe, _helper, _owner
    lines = []
    if pid is not None:
        lines.append("%spid\t%d\n" % (prefix, int(pid)))
    if path is not None:
        lines.append("%sdir\t%s\n" % (prefix, os.path.abspath(os.fspath(path))))
    with _lock:
        try:
            if _pipe is None or _owner != os.getpid():
                if not start:
                    return
                # A forked child starts its own helper: the parent's pipe
                # ends with the parent, not with the child.
                _helper = subprocess.Popen(
                    [sys.executable, "-S", os.path.abspath(__file__)],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True, close_fds=True)
                _pipe = _helper.stdin
                _owner = os.getpid()
            _pipe.write("".join(lines).encode("utf-8", "surrogateescape"))
            _pipe.flush()
        except (OSError, ValueError):
            pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is gone for this purpose; watched processes
    # are not our children, so this only guards against pid reuse races.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid, sig):
    for target in (-pid, pid):  # its group when it leads one, else itself
        try:
            os.kill(target, sig)
            return
        except (ProcessLookupError, PermissionError):
            continue


def run(stream):
    """The helper: collects instructions until end of file, then cleans up."""
    pids, dirs = [], []
    for raw in stream:
        kind, _, value = raw.decode("utf-8", "surrogateescape").rstrip("\n").partition("\t")
        if kind == "pid" and value.isdigit():
            pids.append(int(value))
        elif kind == "-pid" and value.isdigit() and int(value) in pids:
            pids.remove(int(value))
        elif kind == "dir" and value:
            dirs.append(value)
        elif kind == "-dir" and value in dirs:
            dirs.remove(value)
    live = [p for p in pids if _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in live:
            _signal(p, sig)
        end = time.monotonic() + GRACE
        while live and time.monotonic() < end:
            time.sleep(0.05)
            live = [p for p in live if _alive(p)]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run(sys.stdin.buffer)
