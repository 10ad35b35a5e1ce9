#!/usr/bin/python3
"""W4 (BRIEF section 6) on CCTools Work Queue 9.9, in its own allocation modes.

Run with Debian's /usr/bin/python3 (package python3-workqueue); benches/w4/run.sh
runs it next to drover on the same task list. One worker declaring 12 cores and
12,000 MB; all tasks in one category that declares no memory; monitoring on (so
Work Queue measures peaks and kills tasks that exceed their allocation).
Prints one JSON line per mode."""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time

import work_queue as wq

MODES = {
    "fixed4000": None,
    "max_throughput": wq.WORK_QUEUE_ALLOCATION_MODE_MAX_THROUGHPUT,
    "min_waste": wq.WORK_QUEUE_ALLOCATION_MODE_MIN_WASTE,
}


def run(mode, tasks, touch, bound):
    q = wq.WorkQueue(port=0)
    q.enable_monitoring()
    cat = "w4"
    if MODES[mode] is not None:
        q.specify_category_mode(cat, MODES[mode])
    workdir = tempfile.mkdtemp(prefix="wq-w4-")
    worker = subprocess.Popen(
        ["work_queue_worker", "--single-shot", "-t", "3600", "--cores", "12",
         "--memory", "12000", "--disk", "20000", "-s", workdir, "localhost", str(q.port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while q.stats.workers_connected < 1:
            if time.time() > deadline:
                sys.exit("work_queue_worker did not connect in 60 s")
            q.wait(1)
        start = time.monotonic()
        for (x, t) in tasks:
            task = wq.Task("%s %d %s" % (touch, x, t))
            task.specify_category(cat)
            if mode == "fixed4000":
                task.specify_cores(1)
                task.specify_memory(4000)
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
        return {"system": "workqueue-9.9", "workload": "W4", "mode": mode, "n": n,
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
    ap.add_argument("--modes", default=",".join(MODES))
    a = ap.parse_args()
    tasks = []
    with open(a.tasks) as f:
        for line in f:
            x, t = line.split()
            tasks.append((int(x), float(t)))
    bound = max(sum(x * t for x, t in tasks) / 12000.0, sum(t for _, t in tasks) / 12.0)
    for mode in a.modes.split(","):
        print(json.dumps(run(mode, tasks, a.touch, bound)), flush=True)


if __name__ == "__main__":
    main()
