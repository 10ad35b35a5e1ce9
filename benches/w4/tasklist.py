"""What benches/w4/oracle.py and wq_w4.py share: the task list, its command
line, its lower bound, and a sampler of memory booked against memory used."""

import os
import threading
import time


def read(path):
    """Returns [(x_mb, t_s, cores)] from a list written by workloads.py; cores
    is 0 where the line gives none (the task sleeps, and books one core)."""
    tasks = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            p = line.split()
            if not p:
                continue
            try:
                if len(p) not in (2, 3):
                    raise ValueError("want X_MB T_S [CORES]")
                x, t = int(p[0]), float(p[1])
                c = int(p[2]) if len(p) == 3 else 0
            except ValueError as e:
                raise SystemExit("%s:%d: %s" % (path, n, e))
            tasks.append((x, t, c))
    if not tasks:
        raise SystemExit("%s: no tasks" % path)
    return tasks


def cores(task):
    """Cores a task uses: its C, or 1 for a sleeping task."""
    return task[2] or 1


def command(touch, task):
    x, t, c = task
    return "%s %d %s" % (touch, x, t) if c == 0 else "%s %d %s %d" % (touch, x, t, c)


def bound(tasks, worker_cores, worker_mb):
    """max(sum X*T / memory, sum C*T / cores): no packing beats it."""
    return max(sum(x * t for x, t, _ in tasks) / float(worker_mb),
               sum(cores(k) * k[1] for k in tasks) / float(worker_cores))


def tree_rss_mb(root):
    """Resident MB of every descendant of `root` (not `root` itself)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                stat = f.read()
            # The command name may hold spaces; the fields after it do not.
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(name))
    page_mb = os.sysconf("SC_PAGE_SIZE") / 1048576.0
    total, stack = 0.0, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open("/proc/%d/statm" % pid) as f:
                total += int(f.read().split()[1]) * page_mb
        except (OSError, IndexError, ValueError):
            pass
    return total


class Sampler(threading.Thread):
    """Every `ms` ms, records (seconds since t0, booked MB, booked cores,
    tasks running, MB resident under `root`) until `stop` is set."""

    def __init__(self, root, t0, ms, booked, stop):
        super().__init__(daemon=True)
        self.root, self.t0, self.dt, self.booked, self.stop = root, t0, ms / 1000.0, booked, stop
        self.rows = []

    def run(self):
        while not self.stop.is_set():
            mb, c, n = self.booked()
            self.rows.append((time.time() - self.t0, mb, c, n, tree_rss_mb(self.root)))
            self.stop.wait(self.dt)

    def write(self, path):
        with open(path, "w") as f:
            f.write("t_s,host,booked_mb,booked_cores,running,used_mb\n")
            for t, mb, c, n, used in self.rows:
                f.write("%.3f,oracle,%d,%d,%d,%.0f\n" % (t, mb, c, n, used))
