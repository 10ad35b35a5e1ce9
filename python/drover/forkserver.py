"""The function server a `drover worker` keeps: one persistent interpreter
that runs Python calls either on long-lived call runners it forked once, or
in a child forked per call: ``python3 forkserver.py SOCKET_FD [CLEANUP_DIR...]``.

The worker starts it (the worker's ``functions`` module; this file and
remote.py are compiled into the binary, so a node needs only Python and
cloudpickle) and talks to it over one stream socket, inherited as
SOCKET_FD, with length-prefixed messages multiplexed by call id. Each
message is a 4-byte big-endian length, then a kind byte and a u64 call id:

worker -> server
  ``R`` run in a forked child: then five u32-length-prefixed strings
        (working directory or empty, the cgroup.procs file the child joins
        first or empty, the modules to import into the server first,
        comma-separated, the call's environment as NUL-separated ``K=V``)
        and the pickled call (empty: read ``.drover-call.pkl`` in the
        working directory).
  ``Q`` run on a call runner: the same body as ``R``, except that the
        second string is the call's memory limit in MB (decimal), or empty,
        followed by ``g`` if the call may grow over it in place.
  ``U`` grow (``Q``, after ``G``): then the new memory limit in MB (u64);
        the runner goes on.
  ``A`` adopted: the worker watches the child now; the server may reap it.
  ``K`` kill: the worker could not watch the child (``R``), or gives up on
        the call (``Q``: its runner is killed, then replaced on demand).

server -> worker
  ``P`` started (``R``): then the child's pid (i32). Sent at once, before
        the call runs; the worker's monitor measures and limits that pid (its
        cgroup where it has one, else /proc).
  ``D`` done (``R``): then the wait status (i32), CPU seconds (f64), peak RSS
        in bytes (u64) from wait4, and what the child wrote to its result
        pipe (a raised flag byte, then the pickled outcome, the call's stdout
        and stderr, each u32-length-prefixed; empty if it died first).
  ``G`` frozen (``Q``): the runner's resident set, then in bytes (u64),
        went over the limit of a call that may grow; it is stopped until
        ``U`` (or ``K``).
  ``F`` finished (``Q``): then a wait status (i32: 0 when the runner
        answered, the runner's own when it died in the call), the call's CPU
        seconds (f64), its peak RSS in bytes (u64), its wall seconds (f64),
        and the outcome as in ``D`` (empty if the runner died).

Call runners (``Q``): the server forks a runner when a call finds none idle
and keeps it for the next calls, so there are as many as calls ran at once.
A runner leads its own session, dies with the server (PR_SET_PDEATHSIG), and
loops: per call it imports the call's modules, sets the call's environment
and working directory, runs the call with stdout and stderr going to
in-memory files, and then restores the environment and directory. It is
measured by differences: CPU is the change of its getrusage() (its own and
its waited-for children's), wall the call's own time, and peak memory is
the runner's VmHWM after resetting it at the start of the call (writing
"5" to /proc/self/clear_refs): the runner's whole resident set at its
highest during the call, interpreter included, as a forked child's peak is.
A runner whose resident set stays more than RECYCLE_MB above where it
started after a call exits, so that a leak does not inflate later peaks.
A call that kills its runner (os._exit, a signal, a crash) ends with the
runner's wait status and no outcome; the next call gets a new runner.
Module-level state a call leaves in a runner (globals, imported modules,
threads, signal handlers, sys.path, processes it started and left running)
is seen by the next calls on it, as in any pool of persistent workers; the
environment and working directory are restored.

Memory limits on runners: the server reads each busy runner's resident set
every SAMPLE_EVERY seconds while its call has a limit; over it, the runner
is killed (``F`` then carries the resident set seen, over the limit), or,
for a call that may grow, stopped with SIGSTOP and reported with ``G`` until
the worker says ``U`` (go on with a bigger limit) or ``K``. The worker also
holds the measured peak of a call that returned against its limit. The
worker sends calls with files to forked children instead: those run in a
sandbox, in a cgroup of their own where the worker has cgroups (a cgroup
charge does not move with a long-lived process, so runners stay in the
server's).

A forked child (``R``) leads its own session (a kill of the task reaches
what it starts), joins the task's cgroup before running anything, points
its stdout and stderr at in-memory files whose contents go back with the
result, and exits. The server reaps it only after ``A``, so its pid is not
reused while the worker may still signal it.

Before forking (a child or a runner), the server imports the call's
modules into itself, once each (the modules the call's function and
arguments come from, as seen at submit), so a call through Parsl's wrappers
does not import Parsl again in every child.

The server watches its parent (the worker): when that goes away, by any
signal, it removes the CLEANUP_DIRs and kills its process group (itself and
every call still running) and every runner.
"""

import fcntl
import os
import resource
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


def _set_env(env):
    """Sets the NUL-separated ``K=V`` items of `env`."""
    for item in env.split(b"\0"):
        key, eq, value = item.partition(b"=")
        if eq:
            os.environb[key] = value


def _outcome(raised, data, outs, truncate=False):
    """The outcome message: the raised flag, the pickled outcome, and what
    the call wrote to the in-memory files `outs` (its stdout and stderr)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    captured = []
    for fd in outs:
        size = os.fstat(fd).st_size
        captured.append(os.pread(fd, size, 0) if size else b"")
        if size and truncate:
            os.ftruncate(fd, 0)
    return bytes([1 if raised else 0]) + _blob(data) + _blob(captured[0]) + _blob(captured[1])


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
        _set_env(env)
        if cwd:
            os.chdir(cwd)
        if not payload:
            with open(".drover-call.pkl", "rb") as f:
                payload = f.read()
        raised, data = run_bytes(payload)
        msg = _outcome(raised, data, outs)
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


#: A runner whose resident set is this much above its start after a call
#: exits rather than carry the call's leftovers into the next calls' peaks
#: (and memory limits).
RECYCLE_MB = 32
#: How often the server reads the resident set of a runner whose call has
#: a memory limit, seconds.
SAMPLE_EVERY = 0.01
_PAGE = os.sysconf("SC_PAGE_SIZE")
_F_HEAD = struct.Struct(">idQd")


def _die_with_parent():
    """Asks the kernel to SIGKILL this process when the server dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # best effort: EOF on the socket also ends an idle runner
        pass


def _close_fds_but(keep):
    """Closes every descriptor from 3 up except `keep` (the server's socket,
    selector and other runners' sockets must not stay open in a runner, or
    their EOFs would never come)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _status_kb(data, field):
    """A ``VmXXX:`` value of /proc/self/status's text `data`, bytes; 0 if absent."""
    at = data.find(field)
    if at < 0:
        return 0
    return int(data[at + len(field):data.index(b"k", at)]) * 1024


def _rss_of(pid):
    """Resident set of process `pid`, bytes; 0 if it is gone."""
    try:
        with open("/proc/%d/statm" % pid, "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cpu():
    """CPU seconds of this process and its waited-for children (getrusage:
    microseconds, where os.times counts clock ticks)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return buf


class _Runner:
    """A runner's own loop (in the forked process)."""

    def __init__(self, sock):
        self.sock = sock
        self.base = os.getcwd()
        self.outs = []
        for fd in (1, 2):
            m = os.memfd_create("drover-out-%d" % fd, 0)
            os.dup2(m, fd)
            os.close(m)
            # Appends wherever the file's offset was left by a truncation.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            self.outs.append(fd)
        try:
            self.clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
        except OSError:
            self.clear = None  # then peak is the runner's since it started
        self.status = os.open("/proc/self/status", os.O_RDONLY)
        self.start_rss = self.rss = _status_kb(os.pread(self.status, 4096, 0), b"VmRSS:")

    def serve(self):
        while True:
            head = _recv_exact(self.sock, 4)
            if head is None:
                return
            (size,) = _U32.unpack(head)
            body = _recv_exact(self.sock, size)
            if body is None:
                return
            reply = self.run(body)
            # A runner that grew too big says so with its answer, so that the
            # server sends it no further call, and exits.
            retire = self.rss > self.start_rss + (RECYCLE_MB << 20)
            self.sock.sendall(_U32.pack(len(reply) + 1) + (b"\1" if retire else b"\0") + reply)
            if retire:
                return

    def run(self, body):
        (cwd, _procs, modules, env), payload = _strings(body, 4)
        preload(modules.decode().split(","))
        saved = dict(os.environb)
        _set_env(env)
        try:
            if cwd:
                os.chdir(cwd)
            payload = bytes(payload)
            if not payload:
                with open(".drover-call.pkl", "rb") as f:
                    payload = f.read()
            if self.clear is not None:
                os.write(self.clear, b"5")
            w0 = time.perf_counter()
            c0 = _cpu()
            raised, data = run_bytes(payload)
            cpu = _cpu() - c0
            wall = time.perf_counter() - w0
            status = os.pread(self.status, 4096, 0)
            peak = _status_kb(status, b"VmHWM:")
            self.rss = _status_kb(status, b"VmRSS:")
        finally:
            if os.environb != saved:
                os.environb.clear()
                os.environb.update(saved)
            os.chdir(self.base)
        # Truncated after reading: the files are the next call's too (their
        # writes append).
        return _F_HEAD.pack(0, cpu, peak, wall) + _outcome(raised, data, self.outs, truncate=True)


def _return_freed_memory():
    """Fixes glibc's mmap and trim thresholds at 128 KiB. By default freeing
    a big block raises them (up to 32 MB), so the next calls' blocks under
    that come from the heap and stay resident after they are freed: a runner
    kept up to 32 MB of earlier calls, which was measured as the next call's
    peak and got it killed over a limit it kept (W4 as functions: 25 kills
    in 120 calls against 3 with a fork per call)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 10)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its own policy holds
        pass


def _runner_main(sock_fd):
    """Runs in a forked runner: serves calls until the server closes its
    socket (or the runner grew too big); never returns."""
    err = 2
    code = 0
    try:
        os.setsid()
        _die_with_parent()
        _return_freed_memory()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        err = os.dup(2)  # the server's stderr, for the runner's own failures
        _Runner(socket.socket(fileno=sock_fd)).serve()
    except BaseException:
        code = 1
        try:
            import traceback

            os.write(err, traceback.format_exc().encode())
        except Exception:
            pass
    os._exit(code)


class _RunnerHandle:
    """The server's side of one runner."""

    __slots__ = ("pid", "sock", "buf", "call", "started", "limit", "over", "grow", "frozen")

    def __init__(self, pid, sock):
        self.pid, self.sock = pid, sock
        self.buf = bytearray()
        self.call = None  # the call id it runs
        self.started = 0.0
        self.limit = 0  # the call's memory limit, bytes; 0 for none
        self.over = 0  # the resident set it was killed at, over its limit
        self.grow = False  # whether its call may grow over its limit
        self.frozen = False  # stopped over its limit, waiting for ``U``


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
        self.writing = False  # registered for EVENT_WRITE too
        self.idle = []
        self.next_sample = 0.0
        #: Runners by the call they run.
        self.busy = {}
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
                if not self.writing:
                    self.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, None)
                    self.writing = True
                return
            del self.out[:n]
        # Only when it changes: an epoll_ctl per message was a tenth of the
        # server's time per call.
        if self.writing:
            self.sel.modify(self.sock, selectors.EVENT_READ, None)
            self.writing = False

    def run_call(self, cid, body):
        (cwd, procs, modules, env), payload = _strings(body, 4)
        preload(modules.decode().split(","))
        r, w = os.pipe()
        try:
            # A big result otherwise crosses in 64 KiB turns of the two
            # processes; 1 MiB made a 200 MB result 1.3-3.4x faster here.
            fcntl.fcntl(r, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except OSError:  # over /proc/sys/fs/pipe-max-size: the default works
            pass
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

    def _new_runner(self):
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            keep = theirs.fileno()
            _close_fds_but(keep)
            _runner_main(keep)
        theirs.close()
        _live.add(pid)
        runner = _RunnerHandle(pid, ours)
        self.sel.register(ours, selectors.EVENT_READ, ("runner", runner))
        return runner

    def run_on_runner(self, cid, body):
        (_cwd, limit, modules, _env), _ = _strings(body, 4)
        preload(modules.decode().split(","))
        runner = self.idle.pop() if self.idle else self._new_runner()
        runner.call = cid
        runner.started = time.perf_counter()
        runner.grow = limit.endswith(b"g")
        limit = limit.rstrip(b"g")
        runner.limit = int(limit) << 20 if limit else 0
        self.busy[cid] = runner
        try:
            # The runner is idle, reading: a blocking send of the call is brief.
            runner.sock.sendall(_U32.pack(len(body)) + body)
        except OSError:
            self._runner_gone(runner)

    def _runner_gone(self, runner):
        """Reaps a runner that closed its socket (it died, or exited to
        recycle itself); its call, if it had one, ends with its status."""
        self.sel.unregister(runner.sock)
        runner.sock.close()
        try:
            os.killpg(runner.pid, signal.SIGKILL)  # what its call started too
        except OSError:
            pass
        _, status = os.waitpid(runner.pid, 0)
        _live.discard(runner.pid)
        if runner in self.idle:
            self.idle.remove(runner)
        if runner.call is not None:
            del self.busy[runner.call]
            wall = time.perf_counter() - runner.started
            # Killed over its limit: the peak seen, which is over it.
            self.send(b"F", runner.call, _F_HEAD.pack(status, 0.0, runner.over, wall))

    def sample(self):
        """Kills each runner whose call is over its memory limit (a call
        that ends first is checked against its measured peak by the worker).
        Returns how long until the next look, or None if none is needed."""
        limited = [r for r in self.busy.values() if r.limit]
        if not limited:
            return None
        now = time.perf_counter()
        if now < self.next_sample:
            return self.next_sample - now
        self.next_sample = now + SAMPLE_EVERY
        for runner in limited:
            if runner.over or runner.frozen or now - runner.started < SAMPLE_EVERY:
                continue
            rss = _rss_of(runner.pid)
            if rss <= runner.limit:
                continue
            try:
                if runner.grow:
                    os.killpg(runner.pid, signal.SIGSTOP)
                    runner.frozen = True
                    self.send(b"G", runner.call, struct.pack(">Q", rss))
                else:
                    runner.over = rss
                    os.killpg(runner.pid, signal.SIGKILL)
            except OSError:
                pass
        return SAMPLE_EVERY

    def on_runner(self, runner):
        try:
            chunk = runner.sock.recv(1 << 20)
        except OSError:
            chunk = b""
        if not chunk:
            self._runner_gone(runner)
            return
        runner.buf += chunk
        if len(runner.buf) < 4:
            return
        (size,) = _U32.unpack_from(runner.buf, 0)
        if len(runner.buf) - 4 < size:
            return
        retire = runner.buf[4] != 0
        reply = bytes(runner.buf[5:4 + size])
        del runner.buf[:4 + size]
        cid, runner.call = runner.call, None
        if runner.frozen:  # stopped just after it answered
            try:
                os.killpg(runner.pid, signal.SIGCONT)
            except OSError:
                pass
        runner.limit = runner.over = 0
        runner.frozen = runner.grow = False
        if cid is not None:
            del self.busy[cid]
            self.send(b"F", cid, reply)
        if not retire:  # else its EOF follows, and it is reaped then
            self.idle.append(runner)

    def on_message(self, kind, cid, body):
        if kind == b"R":
            self.run_call(cid, body)
        elif kind == b"Q":
            self.run_on_runner(cid, body)
        elif kind == b"K" and cid in self.busy:
            try:
                os.killpg(self.busy[cid].pid, signal.SIGKILL)
            except OSError:
                pass
        elif kind == b"U" and cid in self.busy:
            runner = self.busy[cid]
            (mb,) = struct.unpack(">Q", body)
            runner.limit, runner.frozen = mb << 20, False
            try:
                os.killpg(runner.pid, signal.SIGCONT)
            except OSError:
                pass
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
        timeout = None
        while True:
            events = self.sel.select(timeout)
            for key, mask in events:
                if key.data is None:
                    if not self.on_socket(mask):
                        return
                elif key.data[0] == "runner":
                    self.on_runner(key.data[1])
                else:
                    self.on_readable(*key.data)
            timeout = self.sample() if self.busy else None


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
