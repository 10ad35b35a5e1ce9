#!/usr/bin/python3
"""W1-W3 (BRIEF section 6) on CCTools Work Queue, the peer drover is measured against.

Run with Debian's /usr/bin/python3 (package python3-workqueue); benches/core/run_all.sh
runs it next to drover and xargs. Prints one JSON line per result, with the same
fields as benches/workloads.rs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import work_queue as wq

SYSTEM = "workqueue-9.9"


def start_worker(port, cores, workdir):
    # --single-shot: the worker ends with its manager, so nothing outlives a workload.
    return subprocess.Popen(
        ["work_queue_worker", "--single-shot", "-t", "120", "--cores", str(cores),
         "-s", workdir, "localhost", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(tasks, cores, workload, extra=None):
    """Submits `tasks` (a list of wq.Task) after one worker has joined; returns the JSON record."""
    q = wq.WorkQueue(port=0)
    workdir = tempfile.mkdtemp(prefix="wq-bench-")
    worker = start_worker(q.port, cores, workdir)
    try:
        deadline = time.time() + 60
        while q.stats.workers_connected < 1:
            if time.time() > deadline:
                sys.exit("work_queue_worker did not connect in 60 s")
            q.wait(1)
        n = len(tasks)
        start = time.monotonic()
        for t in tasks:
            q.submit(t)
        failed = 0
        while not q.empty():
            t = q.wait(5)
            if t is not None and (t.result != wq.WORK_QUEUE_RESULT_SUCCESS or t.return_status != 0):
                failed += 1
        wall = time.monotonic() - start
        rec = {"system": SYSTEM, "workload": workload, "n": n, "wall_s": round(wall, 4),
               "tasks_per_s": round(n / wall, 2), "failed": failed, "worker_cores": cores}
        if extra:
            rec.update(extra(q, wall, workdir))
        return rec
    finally:
        del q
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def w1(n):
    tasks = []
    for _ in range(n):
        t = wq.Task("true")
        t.specify_cores(1)
        tasks.append(t)
    return run(tasks, 2, "W1")


def w2(n, cores, secs):
    tasks = []
    for _ in range(n):
        t = wq.Task("sleep %s" % secs)
        t.specify_cores(1)
        tasks.append(t)
    ideal = n * secs / cores

    def extra(q, wall, workdir):
        return {"ideal_s": ideal, "ratio_to_ideal": round(wall / ideal, 3)}

    return run(tasks, cores, "W2", extra)


def w3(n, path):
    size = os.path.getsize(path)
    tasks = []
    for _ in range(n):
        t = wq.Task("wc -c input")
        t.specify_cores(1)
        t.specify_input_file(path, "input", cache=True)
        tasks.append(t)

    def extra(q, wall, workdir):
        sent = q.stats.total_bytes_sent
        return {"input_bytes": size, "bytes_sent": sent,
                "input_transfers": round(sent / size, 3)}

    return run(tasks, 2, "W3", extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--w1-n", type=int, default=10000)
    ap.add_argument("--w2-n", type=int, default=400)
    ap.add_argument("--w2-cores", type=int, default=16)
    ap.add_argument("--w2-sleep", type=float, default=0.05)
    ap.add_argument("--w3-n", type=int, default=500)
    ap.add_argument("--w3-input", help="the 50 MB input file (W3)")
    args = ap.parse_args()
    for w in args.workloads.split(","):
        if w == "W1":
            rec = w1(args.w1_n)
        elif w == "W2":
            rec = w2(args.w2_n, args.w2_cores, args.w2_sleep)
        elif w == "W3":
            if not args.w3_input:
                sys.exit("W3 needs --w3-input")
            rec = w3(args.w3_n, args.w3_input)
        else:
            sys.exit("unknown workload %r" % w)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
