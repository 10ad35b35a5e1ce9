"""A fork server that runs PythonTasks on a local worker without starting an
interpreter per task: ``python -m drover.forkserver REQUEST_FIFO``.

`LocalWorker` starts one next to each worker it launches and exports
``DROVER_PY_FORKSERVER=REQUEST_FIFO`` to it. A PythonTask's command sees the
variable, makes a reply FIFO in its sandbox, writes the sandbox path to the
request FIFO (one line, under PIPE_BUF, so writes from concurrent tasks do not
interleave) and blocks reading its exit status from the reply FIFO. The server
forks a child per request, with cloudpickle and the caller's modules already
imported, which runs the call in the sandbox exactly as remote.py would.

What the worker measures for such a task is the waiting shell, not the forked
child, so memory limits are not enforced on it: the server is an opt-out
speed-up for trusted local work (``LocalWorker(fast_python=False)`` turns it off).
"""

import os
import signal
import sys

try:
    from drover.remote import run
except ImportError:  # started from a copy of this file next to remote.py
    from remote import run


def _child(sandbox):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # so the call can wait for its own children
    status = 1
    try:
        os.chdir(sandbox)
        status = run("call.pkl", "result.pkl")
    except BaseException:
        import traceback

        traceback.print_exc()
    try:
        fd = os.open(os.path.join(sandbox, ".drover-reply"), os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"%d\n" % status)
        os.close(fd)
    except OSError:
        pass  # the task was killed: nobody is listening
    os._exit(0)


def serve(fifo):
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    import cloudpickle  # noqa: F401  imported once here, inherited by every fork

    # O_RDWR: the server is also a writer, so the FIFO never reports EOF.
    fd = os.open(fifo, os.O_RDWR)
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            sandbox = line.decode("utf-8", "surrogateescape").strip()
            if not sandbox:
                continue
            if os.fork() == 0:
                _child(sandbox)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m drover.forkserver REQUEST_FIFO\n")
        sys.exit(2)
    serve(sys.argv[1])
