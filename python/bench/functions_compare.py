"""N trivial Python calls, 2 worker slots each, in one run:

- drover.Executor with one local worker of 2 cores (fork server);
- Dask distributed.LocalCluster, 2 workers x 1 thread;
- Parsl HighThroughputExecutor, 2 workers;
- Parsl through drover.parsl.DroverExecutor (one local worker of 2 cores);
- drover.Executor with one `drover worker` process of 2 cores started on its
  own and connected over TCP (as on a remote node: its own function server);
- drover.Executor, local, with the worker's monitor not watching calls
  (DROVER_CALL_MONITOR=0): the difference to the first is what measuring
  and limiting each call costs.

`--reps R` runs the systems R times, alternating (A B C, C B A, ...), and
reports medians; `--numpy N` adds N calls that take and return a 1 MB numpy
array (drover local and remote, Dask, HTEX).

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


def numpy_arg(x):
    return x + 1


def numpy_args(n):
    import numpy

    return [numpy.full(2**17, i, dtype=numpy.float64) for i in range(n)]  # 1 MB each


def check_numpy(results, n):
    assert len(results) == n and all(r[0] == i + 1 for i, r in enumerate(results))


def remote_worker(manager):
    """A `drover worker` process started on its own, connected over TCP."""
    import sys

    import drover

    env = dict(os.environ, DROVER_PYTHON=sys.executable)
    env.pop("DROVER_PY_FORKSERVER", None)
    workdir = tempfile.mkdtemp(prefix="drover-bench-remote-")
    proc = subprocess.Popen([drover.find_drover(), "worker", "127.0.0.1:%d" % manager.port,
                             "--cores", "2", "--workdir", workdir, "--exit-on-disconnect"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, workdir


def drover_run(n, remote=False, numpy=False, monitor=True):
    import drover

    ex = drover.Executor(cores=1)
    proc = None
    try:
        if remote:
            proc, workdir = remote_worker(ex.manager)
        else:
            if not monitor:
                # Calls neither watched nor measured: what the monitor costs per call.
                os.environ["DROVER_CALL_MONITOR"] = "0"
            try:
                ex.manager.local_workers(1, cores=2)
            finally:
                os.environ.pop("DROVER_CALL_MONITOR", None)
        ex.submit(trivial, -1).result()  # worker up before the clock starts
        if numpy:
            args = numpy_args(n)
            start = time.perf_counter()
            results = list(ex.map(numpy_arg, args))
            wall = time.perf_counter() - start
            check_numpy(results, n)
        else:
            start = time.perf_counter()
            total = sum(ex.map(trivial, range(n)))
            wall = time.perf_counter() - start
            expect(total, n)
    finally:
        ex.shutdown()
        if proc is not None:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
    return wall


def drover_executor(n):
    return drover_run(n)


def drover_remote(n):
    return drover_run(n, remote=True)


def drover_unmonitored(n):
    return drover_run(n, monitor=False)


def dask(n, numpy=False):
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.submit(trivial, -1).result()
        if numpy:
            args = numpy_args(n)
            start = time.perf_counter()
            results = client.gather(client.map(numpy_arg, args, pure=False))
            wall = time.perf_counter() - start
            check_numpy(results, n)
            return wall
        start = time.perf_counter()
        total = sum(client.gather(client.map(trivial, range(n), pure=False)))
        wall = time.perf_counter() - start
    expect(total, n)
    return wall


def parsl_with(executor, n, numpy=False):
    import parsl

    run_dir = tempfile.mkdtemp(prefix="drover-bench-parsl-")
    dfk = parsl.load(parsl.Config(executors=[executor], run_dir=run_dir, strategy="none"))
    try:
        app = parsl.python_app(trivial, executors=[executor.label])
        app(-1).result()
        if numpy:
            napp = parsl.python_app(numpy_arg, executors=[executor.label])
            args = numpy_args(n)
            start = time.perf_counter()
            results = [f.result() for f in [napp(a) for a in args]]
            wall = time.perf_counter() - start
            check_numpy(results, n)
            return wall
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


def parsl_htex(n, numpy=False):
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    return parsl_with(HighThroughputExecutor(label="htex", max_workers_per_node=2,
                                             provider=LocalProvider(init_blocks=1, max_blocks=1)),
                      n, numpy)


def parsl_drover(n):
    from drover.parsl import DroverExecutor

    return parsl_with(DroverExecutor(label="drover", local_workers=1, worker_cores=2), n)


SYSTEMS = {
    "drover.Executor (local, 2 slots)": drover_executor,
    "Dask LocalCluster (2 workers x 1 thread)": dask,
    "Parsl HTEX (2 workers)": parsl_htex,
    "Parsl + DroverExecutor (2 slots)": parsl_drover,
    "drover.Executor (1 remote worker over TCP, 2 slots)": drover_remote,
    "drover.Executor (local, 2 slots, monitor off)": drover_unmonitored,
}

NUMPY = {
    "drover.Executor (local), 1 MB numpy": lambda n: drover_run(n, numpy=True),
    "drover.Executor (remote), 1 MB numpy": lambda n: drover_run(n, remote=True, numpy=True),
    "Dask LocalCluster, 1 MB numpy": lambda n: dask(n, numpy=True),
    "Parsl HTEX, 1 MB numpy": lambda n: parsl_htex(n, numpy=True),
}


def main():
    import statistics

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--numpy", type=int, default=0, help="calls with a 1 MB numpy argument")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--only", action="append", help="run only systems whose name contains this")
    args = ap.parse_args()
    plan = [(name, fn, args.n) for name, fn in SYSTEMS.items()]
    if args.numpy:
        plan += [(name, fn, args.numpy) for name, fn in NUMPY.items()]
    plan = [p for p in plan if not args.only or any(o.lower() in p[0].lower() for o in args.only)]
    walls = {name: [] for name, _, _ in plan}
    for rep in range(args.reps):
        for name, fn, n in (plan if rep % 2 == 0 else plan[::-1]):
            wall = fn(n)
            walls[name].append(wall)
            print(json.dumps({"system": name, "rep": rep, "n": n, "wall_s": round(wall, 3),
                              "tasks_per_s": round(n / wall, 1)}), flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    print("\n%d trivial calls, %d numpy calls, %d reps alternating (medians), commit %s, %s\n"
          % (args.n, args.numpy, args.reps, commit, datetime.date.today()))
    print("| system | calls | wall (s) | calls/s |\n|---|---:|---:|---:|")
    for name, _, n in plan:
        wall = statistics.median(walls[name])
        print("| %s | %d | %.1f | %.0f |" % (name, n, wall, n / wall))


if __name__ == "__main__":
    main()
