"""The function server a `drover worker` keeps: one persistent interpreter
that forks a child per Python call, so a call costs a fork instead of an
interpreter start: ``python3 forkserver.py SOCKET_FD [CLEANUP_DIR...]``.

The worker starts it (the worker's ``functions`` module; this file and
remote.py are compiled into the binary, so a node needs only Python and
cloudpickle) and talks to it over one stream socket, inherited as
SOCKET_FD, with length-prefixed messages multiplexed by call id. Each
message is a 4-byte big-endian length, then a kind byte and a u64 call id:

worker -> server
  ``R`` run: then five u32-length-prefixed strings (working directory or
        empty, the cgroup.procs file the child joins first or empty, the
        modules to import into the server first, comma-separated, the
        call's environment as NUL-separated ``K=V``) and the pickled call
        (empty: read ``.drover-call.pkl`` in the working directory).
  ``A`` adopted: the worker watches the child now; the server may reap it.
  ``K`` kill: the worker could not watch the child; end it.

server -> worker
  ``P`` started: then the child's pid (i32). Sent at once, before the call
        runs; the worker's monitor measures and limits that pid (its cgroup
        where it has one, else /proc).
  ``D`` done: then the wait status (i32), CPU seconds (f64), peak RSS in
        bytes (u64) from wait4, and what the child wrote to its result pipe
        (a raised flag byte, then the pickled outcome, the call's stdout and
        stderr, each u32-length-prefixed; empty if it died first).

A child leads its own session (a kill of the task reaches what it starts),
joins the task's cgroup before running anything, points its stdout and
stderr at in-memory files whose contents go back with the result, and
exits. The server reaps it only after ``A``, so its pid is not reused while
the worker may still signal it.

Before forking, the server imports the call's modules into itself, once
each (the modules the call's function and arguments come from, as seen at
submit), so a call through Parsl's wrappers does not import Parsl again in
every child.

The server watches its parent (the worker): when that goes away, by any
signal, it removes the CLEANUP_DIRs and kills its process group (itself and
every call still running).
"""

import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import threading
import time

if __package__:
    from .remote import run_bytes
else:  # a copy of this file next to remote.py (a `drover worker`'s own server)
    from remote import run_bytes

_imported = set()
#: Pids of the calls running (each leads its own session), for the kill
#: when the worker goes away.
_live = set()
_HEAD = struct.Struct(">IcQ")
_U32 = struct.Struct(">I")


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


def _strings(body, n):
    """`n` u32-length-prefixed strings from `body`, and what follows them."""
    out, at = [], 0
    for _ in range(n):
        (size,) = _U32.unpack_from(body, at)
        at += 4
        out.append(bytes(body[at:at + size]))
        at += size
    return out, body[at:]


def _blob(data):
    return _U32.pack(len(data)) + data


def _child(cwd, procs, env, payload, result_fd):
    """Runs in the forked child: never returns."""
    try:
        os.setsid()
        if procs:
            # First, so that everything the call allocates is charged to it.
            try:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))
            except OSError:
                pass
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # so the call can wait for its own children
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        outs = []
        for fd in (1, 2):
            m = os.memfd_create("drover-out-%d" % fd, 0)
            os.dup2(m, fd)
            os.close(m)
            outs.append(fd)
        for item in env.split(b"\0"):
            key, eq, value = item.partition(b"=")
            if eq:
                os.environb[key] = value
        if cwd:
            os.chdir(cwd)
        if not payload:
            with open(".drover-call.pkl", "rb") as f:
                payload = f.read()
        raised, data = run_bytes(payload)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        captured = []
        for fd in outs:
            size = os.lseek(fd, 0, os.SEEK_END)
            captured.append(os.pread(fd, size, 0) if size else b"")
        msg = bytes([1 if raised else 0]) + _blob(data) + _blob(captured[0]) + _blob(captured[1])
        view = memoryview(msg)
        while view:
            view = view[os.write(result_fd, view):]
    except BaseException:
        try:
            import traceback

            os.write(2, traceback.format_exc().encode())
        except Exception:
            pass
        os._exit(1)
    os._exit(0)


class _Call:
    __slots__ = ("id", "pid", "pidfd", "result_fd", "result", "exited", "adopted")

    def __init__(self, cid, pid, pidfd, result_fd):
        self.id, self.pid, self.pidfd, self.result_fd = cid, pid, pidfd, result_fd
        self.result = bytearray()
        self.exited = False
        self.adopted = False


class Server:
    def __init__(self, sock):
        self.sock = sock
        self.sel = selectors.DefaultSelector()
        self.calls = {}
        self.inbuf = bytearray()
        self.out = bytearray()
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, None)

    def send(self, kind, cid, body=b""):
        self.out += _HEAD.pack(9 + len(body), kind, cid) + body
        self._flush()

    def _flush(self):
        while self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                self.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, None)
                return
            del self.out[:n]
        self.sel.modify(self.sock, selectors.EVENT_READ, None)

    def run_call(self, cid, body):
        (cwd, procs, modules, env), payload = _strings(body, 4)
        preload(modules.decode().split(","))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            self.sock.close()
            _child(cwd.decode("utf-8", "surrogateescape"), procs.decode("utf-8", "surrogateescape"),
                   env, bytes(payload), w)
        os.close(w)
        _live.add(pid)
        pidfd = os.pidfd_open(pid)
        call = _Call(cid, pid, pidfd, r)
        self.calls[cid] = call
        os.set_blocking(r, False)
        self.sel.register(r, selectors.EVENT_READ, ("result", call))
        self.sel.register(pidfd, selectors.EVENT_READ, ("exit", call))
        self.send(b"P", cid, struct.pack(">i", pid))

    def on_message(self, kind, cid, body):
        if kind == b"R":
            self.run_call(cid, body)
        elif kind in (b"A", b"K"):
            call = self.calls.get(cid)
            if call is None:
                return
            if kind == b"K" and not call.exited:
                try:
                    os.killpg(call.pid, signal.SIGKILL)
                except OSError:
                    pass
            call.adopted = True
            self._maybe_done(call)

    def _maybe_done(self, call):
        if not (call.exited and call.adopted and call.result_fd is None):
            return
        del self.calls[call.id]
        _live.discard(call.pid)
        os.close(call.pidfd)
        _, status, ru = os.wait4(call.pid, 0)
        cpu = ru.ru_utime + ru.ru_stime
        body = struct.pack(">idQ", status, cpu, ru.ru_maxrss * 1024) + bytes(call.result)
        self.send(b"D", call.id, body)

    def on_readable(self, what, call):
        if what == "exit":
            self.sel.unregister(call.pidfd)
            call.exited = True
        else:
            try:
                chunk = os.read(call.result_fd, 1 << 20)
            except BlockingIOError:
                return
            if chunk:
                call.result += chunk
                return
            self.sel.unregister(call.result_fd)
            os.close(call.result_fd)
            call.result_fd = None
        self._maybe_done(call)

    def on_socket(self, mask):
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if not mask & selectors.EVENT_READ:
            return True
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        buf = self.inbuf
        buf += chunk
        at = 0
        while len(buf) - at >= 4:
            (size,) = _U32.unpack_from(buf, at)
            if len(buf) - at - 4 < size:
                break
            _, kind, cid = _HEAD.unpack_from(buf, at)
            # A copy: a view would pin `buf`, which is resized below.
            self.on_message(kind, cid, bytes(buf[at + 13:at + 4 + size]))
            at += 4 + size
        del buf[:at]
        return True

    def serve(self):
        while True:
            for key, mask in self.sel.select():
                if key.data is None:
                    if not self.on_socket(mask):
                        return
                else:
                    self.on_readable(*key.data)


def _watch_parent(cleanup):
    """Ends the server and its calls when the process that started it dies."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    for d in cleanup:
        shutil.rmtree(d, ignore_errors=True)
    _kill_calls()
    os.killpg(0, signal.SIGKILL)


def _kill_calls():
    for pid in list(_live):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def serve(fd, cleanup=()):
    preload(["cloudpickle"])
    if os.getpgrp() == os.getpid():  # only a group leader may kill its whole group
        threading.Thread(target=_watch_parent, args=(list(cleanup),), daemon=True).start()
    sock = socket.socket(fileno=fd)
    if os.environ.pop("DROVER_FORKSERVER_READY", None):
        # The worker that started this server waits for this line.
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    try:
        Server(sock).serve()
    finally:
        _kill_calls()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.stderr.write("usage: forkserver.py SOCKET_FD [CLEANUP_DIR...]\n")
        sys.exit(2)
    serve(int(sys.argv[1]), sys.argv[2:])
