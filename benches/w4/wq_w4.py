#!/usr/bin/python3
"""W4 (BRIEF section 6) on CCTools Work Queue 9.9, in its own allocation modes.

Run with Debian's /usr/bin/python3 (package python3-workqueue); benches/w4/run.sh
and honest.sh run it next to drover on the same task list (lines "X_MB T_S" or
"X_MB T_S C", see workloads.py). One worker declaring --cores and --memory-mb
(12 / 12,000); all tasks in one category that declares no memory; monitoring on
(so Work Queue measures peaks and kills tasks that exceed their allocation).
Modes: fixed4000 (each task declares its cores and 4,000 MB), fixedmax (its
cores and the largest X of the list plus 16 MB, the allowance the oracles
give: what a user who knows only the biggest task would declare), max_throughput, min_waste (tasks declare nothing).
Prints one JSON line per mode."""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time

import os

import work_queue as wq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasklist  # noqa: E402

MODES = {
    "fixed4000": None,
    "fixedmax": None,
    "max_throughput": wq.WORK_QUEUE_ALLOCATION_MODE_MAX_THROUGHPUT,
    "min_waste": wq.WORK_QUEUE_ALLOCATION_MODE_MIN_WASTE,
}


def fixed_mb(mode, tasks):
    """Memory every task declares in a fixed mode."""
    return 4000 if mode == "fixed4000" else max(x for x, _, _ in tasks) + 16


def run(mode, tasks, a, bound):
    q = wq.WorkQueue(port=0)
    q.enable_monitoring()
    cat = "w4"
    if MODES[mode] is not None:
        q.specify_category_mode(cat, MODES[mode])
    workdir = tempfile.mkdtemp(prefix="wq-w4-")
    worker = subprocess.Popen(
        ["work_queue_worker", "--single-shot", "-t", "3600", "--cores", str(a.cores),
         "--memory", str(a.memory_mb), "--disk", "20000", "-s", workdir, "localhost",
         str(q.port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while q.stats.workers_connected < 1:
            if time.time() > deadline:
                sys.exit("work_queue_worker did not connect in 60 s")
            q.wait(1)
        start = time.monotonic()
        for spec in tasks:
            task = wq.Task(tasklist.command(a.touch, spec))
            task.specify_category(cat)
            if mode in ("fixed4000", "fixedmax"):
                task.specify_cores(tasklist.cores(spec))
                task.specify_memory(fixed_mb(mode, tasks))
            q.submit(task)
        lost = 0
        retries = 0
        while not q.empty():
            task = q.wait(5)
            if task is None:
                # Work Queue holds tasks while no worker is connected; a
                # worker that exited would leave this loop waiting forever.
                if worker.poll() is not None:
                    sys.exit("work_queue_worker exited with %d tasks left" % q.stats.tasks_waiting)
                continue
            if task.result != wq.WORK_QUEUE_RESULT_SUCCESS or task.return_status != 0:
                lost += 1
        wall = time.monotonic() - start
        # Attempts killed for exceeding their allocation, each retried.
        retries = q.stats.tasks_exhausted_attempts
        n = len(tasks)
        return {"system": "workqueue-9.9", "workload": a.workload, "mode": mode, "n": n,
                "wall_s": round(wall, 3), "tasks_per_s": round(n / wall, 3),
                "ratio_to_bound": round(wall / bound, 3), "retries": retries, "lost": lost}
    finally:
        del q
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--touch", required=True)
    ap.add_argument("--modes", default="fixed4000,max_throughput,min_waste")
    ap.add_argument("--workload", default="W4")
    ap.add_argument("--cores", type=int, default=12)
    ap.add_argument("--memory-mb", type=int, default=12000)
    a = ap.parse_args()
    tasks = tasklist.read(a.tasks)
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit("wq_w4.py: unknown mode(s) %s; known: %s" % (",".join(unknown), ",".join(MODES)))
    for mode in modes:
        # Work Queue would hold such tasks forever, waiting for a bigger worker.
        if mode.startswith("fixed") and fixed_mb(mode, tasks) > a.memory_mb:
            sys.exit("wq_w4.py: %s declares %d MB, more than the worker's %d" %
                     (mode, fixed_mb(mode, tasks), a.memory_mb))
    bound = tasklist.bound(tasks, a.cores, a.memory_mb)
    for mode in modes:
        print(json.dumps(run(mode, tasks, a, bound)), flush=True)


if __name__ == "__main__":
    main()
