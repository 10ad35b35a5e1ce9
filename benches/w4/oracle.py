#!/usr/bin/env python3
"""The outside oracle for benches/w4/honest.sh: a packer that knows each task's
memory and cores and starts each task directly (the same touch_mem command line
the other systems run), with no scheduler, worker or monitor in between.

Greedy in task order: whenever a task ends, it walks the tasks not started yet
in order and starts every one that fits (first fit), keeping at most --cores
cores and --memory-mb MB booked; a task books X + --overhead-mb MB (the same
allowance drover's own oracle mode gives) and its cores (1 unless the task list
gives C). `--policy fifo` stops the walk at the first task that does not fit.

Prints one JSON line in the format of master/benches/w4.rs. With --trace PREFIX,
also writes PREFIX.tasks.jsonl (one record per task: booked MB, start, end and
peak RSS) and PREFIX.samples.csv (booked against used memory every
--sample-ms), which benches/w4/timeline.py reads."""

import argparse
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tasklist  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--touch", required=True)
    ap.add_argument("--workload", default="W4")
    ap.add_argument("--cores", type=int, default=12)
    ap.add_argument("--memory-mb", type=int, default=12000)
    ap.add_argument("--overhead-mb", type=int, default=16)
    ap.add_argument("--policy", choices=("firstfit", "fifo"), default="firstfit")
    ap.add_argument("--trace", help="write PREFIX.tasks.jsonl and PREFIX.samples.csv")
    ap.add_argument("--sample-ms", type=int, default=100)
    a = ap.parse_args()
    tasks = tasklist.read(a.tasks)
    for i, task in enumerate(tasks):
        x, c = task[0], tasklist.cores(task)
        if x + a.overhead_mb > a.memory_mb or c > a.cores:
            sys.exit("oracle: task %d (%d MB, %d cores) does not fit the worker" % (i, x, c))

    booked = {"mb": 0, "cores": 0}
    running = {}  # pid -> (index, mb, cores, start)
    records = []
    lock = threading.Lock()
    t0 = time.time()
    stop = threading.Event()
    sampler = None
    if a.trace:
        def booked_now():
            with lock:
                return booked["mb"], booked["cores"], len(running)
        sampler = tasklist.Sampler(os.getpid(), t0, a.sample_ms, booked_now, stop)
        sampler.start()

    devnull = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
    start = time.monotonic()
    pending = list(range(len(tasks)))
    lost = 0
    while pending or running:
        started_any = True
        while started_any:
            started_any = False
            for i in list(pending):
                mb, c = tasks[i][0] + a.overhead_mb, tasklist.cores(tasks[i])
                if booked["mb"] + mb <= a.memory_mb and booked["cores"] + c <= a.cores:
                    # posix_spawn, not subprocess: subprocess reaps children
                    # whose Popen object is gone, which would race os.wait4.
                    argv = tasklist.command(a.touch, tasks[i]).split()
                    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=devnull)
                    with lock:
                        running[pid] = (i, mb, c, time.time())
                        booked["mb"] += mb
                        booked["cores"] += c
                    pending.remove(i)
                    started_any = True
                elif a.policy == "fifo":
                    break
        if not running:
            sys.exit("oracle: nothing running and nothing fits")
        pid, status, ru = os.wait4(-1, 0)
        end = time.time()
        if pid not in running:
            continue
        with lock:
            i, mb, c, st = running.pop(pid)
            booked["mb"] -= mb
            booked["cores"] -= c
        ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        lost += 0 if ok else 1
        records.append({"id": i, "host": "oracle", "alloc_mb": mb, "cores": c,
                        "start_s": round(st - t0, 3), "end_s": round(end - t0, 3),
                        "peak_mb": round(ru.ru_maxrss / 1024.0, 1), "attempts": 1,
                        "ok": ok})
    wall = time.monotonic() - start
    stop.set()
    if sampler:
        sampler.join()
        sampler.write(a.trace + ".samples.csv")
        with open(a.trace + ".tasks.jsonl", "w") as f:
            for r in sorted(records, key=lambda r: r["id"]):
                f.write(json.dumps(r) + "\n")
    n = len(tasks)
    bound = tasklist.bound(tasks, a.cores, a.memory_mb)
    print(json.dumps({"system": "oracle", "workload": a.workload, "mode": a.policy, "n": n,
                      "wall_s": round(wall, 3), "tasks_per_s": round(n / wall, 3),
                      "ratio_to_bound": round(wall / bound, 3), "retries": 0, "lost": lost}),
          flush=True)


if __name__ == "__main__":
    main()
