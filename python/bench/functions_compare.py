"""N trivial Python calls, 2 worker slots each, in one run:

- drover.Executor with one local worker of 2 cores (fork server);
- Dask distributed.LocalCluster, 2 workers x 1 thread;
- Parsl HighThroughputExecutor, 2 workers;
- Parsl through drover.parsl.DroverExecutor (one local worker of 2 cores).

Prints one JSON line per system (wall time from the first submit to the last
result, workers already up) and a markdown table at the end.

    DROVER_BIN=target/release/drover python3 python/bench/functions_compare.py --n 10000
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import time


def trivial(x):
    return x + 1


def expect(total, n):
    assert total == n * (n + 1) // 2, (total, n)


def drover_executor(n):
    import drover

    ex = drover.Executor(cores=1)
    try:
        ex.manager.local_workers(1, cores=2)
        ex.submit(trivial, -1).result()  # worker up before the clock starts
        start = time.perf_counter()
        total = sum(ex.map(trivial, range(n)))
        wall = time.perf_counter() - start
    finally:
        ex.shutdown()
    expect(total, n)
    return wall


def dask(n):
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.submit(trivial, -1).result()
        start = time.perf_counter()
        total = sum(client.gather(client.map(trivial, range(n), pure=False)))
        wall = time.perf_counter() - start
    expect(total, n)
    return wall


def parsl_with(executor, n):
    import parsl

    run_dir = tempfile.mkdtemp(prefix="drover-bench-parsl-")
    dfk = parsl.load(parsl.Config(executors=[executor], run_dir=run_dir, strategy="none"))
    try:
        app = parsl.python_app(trivial, executors=[executor.label])
        app(-1).result()
        start = time.perf_counter()
        futures = [app(i) for i in range(n)]
        total = sum(f.result() for f in futures)
        wall = time.perf_counter() - start
    finally:
        dfk.cleanup()
        parsl.clear()
        shutil.rmtree(run_dir, ignore_errors=True)
    expect(total, n)
    return wall


def parsl_htex(n):
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    return parsl_with(HighThroughputExecutor(label="htex", max_workers_per_node=2,
                                             provider=LocalProvider(init_blocks=1, max_blocks=1)), n)


def parsl_drover(n):
    from drover.parsl import DroverExecutor

    return parsl_with(DroverExecutor(label="drover", local_workers=1, worker_cores=2), n)


SYSTEMS = {
    "drover.Executor (local, 2 slots)": drover_executor,
    "Dask LocalCluster (2 workers x 1 thread)": dask,
    "Parsl HTEX (2 workers)": parsl_htex,
    "Parsl + DroverExecutor (2 slots)": parsl_drover,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--only", action="append", help="run only systems whose name contains this")
    args = ap.parse_args()
    rows = []
    for name, fn in SYSTEMS.items():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        wall = fn(args.n)
        rate = args.n / wall
        rows.append((name, wall, rate))
        print(json.dumps({"system": name, "n": args.n, "wall_s": round(wall, 3),
                          "tasks_per_s": round(rate, 1)}), flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    print("\n%d trivial calls, commit %s, %s\n" % (args.n, commit, datetime.date.today()))
    print("| system | wall (s) | calls/s |\n|---|---:|---:|")
    for name, wall, rate in rows:
        print("| %s | %.1f | %.0f |" % (name, wall, rate))


if __name__ == "__main__":
    main()
