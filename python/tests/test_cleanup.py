"""A master Python process that dies by a signal leaves nothing behind: no
drover directory in its temporary directory, and none of the processes it
started (workers, function servers, running calls). Each case runs a real
program in a subprocess, with a call running on a local worker (or no
worker at all) and a large argument staged, and kills it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PROGRAM = textwrap.dedent("""
    import sys, time
    import drover

    m = drover.Manager(port=0)
    local = sys.argv[1] == "local"
    if local:
        m.local_workers(1, cores=2)
    # One call runs (a forked child on the worker); one waits, with an
    # argument big enough to be staged rather than sent inline.
    m.submit(drover.PythonTask(time.sleep, 600))
    m.submit(drover.PythonTask(len, b"x" * (3 << 20)))
    end = time.monotonic() + 120
    while local and m.stats.tasks_running < 1:
        if time.monotonic() > end:
            sys.exit("the call did not start")
        time.sleep(0.05)
    time.sleep(0.5)  # the worker has forked the call
    print("ready", flush=True)
    time.sleep(600)
""")


def _start_time(pid):
    """The kernel's start time of `pid` (tells a reused pid apart), or None when gone or a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _descendants(root):
    """(pid, start time) of every live process below `root`, in any session."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            start = _start_time(child)
            if start is not None:
                out.append((child, start))
                stack.append(child)
    return out


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


def _leftovers(procs, tmp):
    alive = [p for p, start in procs if _start_time(p) == start]
    files = sorted(os.listdir(tmp))
    return alive, files


@pytest.mark.parametrize("workers", ["local", "none"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_killed_master_leaves_nothing_behind(tmp_path, sig, workers):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    p = subprocess.Popen([sys.executable, "-c", PROGRAM, workers], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    procs = []
    try:
        line = p.stdout.readline()
        assert line.strip() == "ready", "program did not start: %r %s" % (line, p.stderr.read()[-3000:]
                                                                         if p.poll() is not None else "")
        procs = _descendants(p.pid)
        before = os.listdir(tmp)
        if workers == "local":
            # The worker, its function server and the running call, at least.
            assert len(procs) >= 3, procs
            assert any(n.startswith("drover-") for n in before), before
        # Without workers nothing is on disk to begin with: a call, even one
        # sent as a file, is held in memory until a worker takes it.
        os.kill(p.pid, sig)
        p.wait(60)
        end = time.monotonic() + 60
        alive, files = _leftovers(procs, tmp)
        while (alive or files) and time.monotonic() < end:
            time.sleep(0.2)
            alive, files = _leftovers(procs, tmp)
        assert not alive, "left running: %s" % [_cmdline(pid) for pid in alive]
        assert not files, "left in TMPDIR: %s" % files
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for pid in _leftovers(procs, tmp)[0]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
