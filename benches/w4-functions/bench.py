#!/usr/bin/env python3
"""W4 as Python functions: the 120 memory sizes and durations of W4
(benches/w4/workloads.py, seed 4) as PythonTask calls that each touch X MB
and hold it for T s, on one `drover worker` process started on its own
(its function server forks every call, and its monitor measures and limits
each forked call).

Two systems, in ABBA pairs (oracle, drover | drover, oracle | ...), each run
on a fresh manager and worker:

- drover: every call in one category in bucketing mode, declaring one core
  and no memory: the category learns from the calls' measured peaks;
- oracle: every call declares its true memory (X plus the forked call's own
  baseline, measured once per run by an empty call), in a "fixed" category.

A run's time is from the first submit to the last result; every call must
succeed and return its X (nothing lost). Prints one JSON line per run and
per pair (drover / oracle), and the median ratio over pairs.

    DROVER_BIN=target/release/drover python3 benches/w4-functions/bench.py \
        [--pairs 3] [--mem-scale 0.1] [--n 120] [--out results.jsonl]

Needs the drover Python package (python/, `maturin develop`) and cloudpickle.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "w4"))

import workloads  # noqa: E402  (benches/w4/workloads.py: the one W4 task list)

import drover  # noqa: E402


def hold(x_mb, t_s):
    """Touches x_mb MB (every page), holds it t_s seconds, returns x_mb."""
    if x_mb:
        b = bytearray(x_mb << 20)
        b[::4096] = b"\x01" * len(range(0, len(b), 4096))
    time.sleep(t_s)
    return x_mb


#: MB the probe call touches (the oracle's per-call baseline is its peak less this).
PROBE_MB = 50


def task_list(n, seed, scale):
    return [(max(1, int(round(x * scale))), t) for x, t, _ in workloads.tasks("w4", n, seed)]


class Worker:
    """A `drover worker` of `cores` cores and `memory` MB, connected to `manager` over TCP."""

    def __init__(self, manager, cores, memory):
        self.workdir = tempfile.mkdtemp(prefix="drover-w4fn-")
        env = dict(os.environ, DROVER_PYTHON=sys.executable)
        env.pop("DROVER_PY_FORKSERVER", None)
        env.pop("DROVER_FUNCTION_SERVER", None)
        self.proc = subprocess.Popen(
            [drover.find_drover(), "worker", "127.0.0.1:%d" % manager.port, "--cores", str(cores),
             "--memory", str(memory), "--workdir", self.workdir, "--exit-on-disconnect"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def wait_all(m, count, timeout):
    out = []
    end = time.monotonic() + timeout
    while len(out) < count:
        left = end - time.monotonic()
        if left <= 0:
            raise RuntimeError("only %d of %d results within %s s" % (len(out), count, timeout))
        r = m.wait(min(left, 5.0))
        if r is not None:
            out.append(r)
    return out


def run(system, tasks, cores, memory, timeout):
    """One run on a fresh manager and worker; returns its record."""
    m = drover.Manager(port=0)
    w = Worker(m, cores, memory)
    try:
        # The worker is up and its function server warm before the clock
        # starts; a probe call's peak over what it touched is what a forked
        # call costs by itself.
        m.category("w4fn-probe", mode="fixed")
        probe = drover.PythonTask(hold, PROBE_MB, 1.0)  # held: the monitor samples its peak
        probe.set_category("w4fn-probe").set_cores(1)
        m.submit(probe)
        (r,) = wait_all(m, 1, timeout)
        if r.outcome != "success" or r.output != PROBE_MB:
            raise RuntimeError("probe call failed: %s" % r.outcome)
        base = max(0.0, float(r.measured.get("memory_mb") or 0.0) - PROBE_MB)
        if system == "oracle":
            m.category("w4fn-oracle", mode="fixed")
        else:
            m.category("w4fn", mode="bucketing")
        ids = {}
        start = time.perf_counter()
        for x, t in tasks:
            task = drover.PythonTask(hold, x, t)
            task.set_cores(1)
            if system == "oracle":
                # Its true peak: what the call touches plus the forked
                # call's own pages, rounded up.
                task.set_category("w4fn-oracle").set_memory(int(x + base + 1))
            else:
                task.set_category("w4fn")
            ids[m.submit(task)] = x
        results = wait_all(m, len(tasks), timeout)
        wall = time.perf_counter() - start
        lost = [r.id for r in results if r.outcome != "success" or r.output != ids.get(r.id)]
        attempts = sum(len(r.attempts) for r in results)
        stats = m.stats
        return {
            "system": system, "wall_s": round(wall, 3), "tasks": len(tasks), "lost": len(lost),
            "attempts": attempts, "base_mb": round(base, 1),
            "requeued": stats.get("tasks_requeued"), "grown": stats.get("tasks_grown"),
            "resized": stats.get("tasks_resized"),
            "peak_over_x_mb": round(statistics.median(
                float(r.measured.get("memory_mb") or 0.0) - ids[r.id] for r in results if r.id in ids), 1),
        }
    finally:
        m.shutdown()
        w.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--mem-scale", type=float, default=0.1,
                    help="multiplies every call's memory and the worker's (12,000 MB at 1)")
    ap.add_argument("--cores", type=int, default=12, help="the worker's cores (W4: 12)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for one run")
    ap.add_argument("--out", help="append JSON lines to this file")
    args = ap.parse_args()
    if args.pairs < 1 or args.n < 1 or args.mem_scale <= 0:
        ap.error("--pairs and --n must be at least 1, --mem-scale above 0")
    tasks = task_list(args.n, args.seed, args.mem_scale)
    memory = int(round(12000 * args.mem_scale))
    out = open(args.out, "a") if args.out else None

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    ratios = []
    for pair in range(args.pairs):
        order = ("oracle", "drover") if pair % 2 == 0 else ("drover", "oracle")
        walls = {}
        for slot, system in enumerate(order):
            rec = run(system, tasks, args.cores, memory, args.timeout)
            rec.update(pair=pair + 1, slot=slot, mem_scale=args.mem_scale, worker_mb=memory,
                       worker_cores=args.cores, load=round(os.getloadavg()[0], 2))
            emit(rec)
            if rec["lost"]:
                raise SystemExit("%s lost %d calls" % (system, rec["lost"]))
            walls[system] = rec["wall_s"]
        ratios.append(walls["drover"] / walls["oracle"])
        emit({"pair": pair + 1, "drover_over_oracle": round(ratios[-1], 3)})
    summary = {"pairs": len(ratios), "median_drover_over_oracle": round(statistics.median(ratios), 3),
               "ratios": [round(r, 3) for r in ratios]}
    emit(summary)
    if out:
        out.close()


if __name__ == "__main__":
    main()
