"""Python tasks vs Dask: N trivial function calls on one local worker of 2 cores.

drover: N PythonTasks, one `drover worker --cores 2` (each task 1 core), each
call run by a fresh `python3` on the worker. Dask: distributed.LocalCluster
(n_workers=1, threads_per_worker=2, processes=True), client.map + gather.
Prints one JSON line per system and one with the ratio.

    DROVER_BIN=target/release/drover python3 python/bench/dask_compare.py --n 10000
"""

import argparse
import json
import time

import drover


def trivial(x):
    return x + 1


def run_drover(n, cores):
    with drover.Manager(port=0) as m:
        m.local_workers(1, cores=cores)
        start = time.perf_counter()
        for i in range(n):
            m.submit(drover.PythonTask(trivial, i).set_cores(1))
        total = 0
        ok = 0
        while not m.empty():
            r = m.wait(300)
            if r is None:
                raise SystemExit("drover: no result in 300 s")
            total += r.output
            ok += 1
        wall = time.perf_counter() - start
    assert ok == n and total == n * (n + 1) // 2, (ok, total)
    return wall


def run_dask(n, cores):
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=cores, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.submit(trivial, -1).result()  # worker up before the clock starts
        start = time.perf_counter()
        futures = client.map(trivial, range(n), pure=False)
        total = sum(client.gather(futures))
        wall = time.perf_counter() - start
    assert total == n * (n + 1) // 2
    return wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    rates = {}
    for system, fn in (("dask", run_dask), ("drover", run_drover)):
        wall = fn(args.n, args.cores)
        rates[system] = args.n / wall
        print(json.dumps({"system": system, "workload": "python_trivial", "n": args.n,
                          "wall_s": round(wall, 3), "tasks_per_s": round(rates[system], 1),
                          "worker_cores": args.cores}), flush=True)
    print(json.dumps({"system": "ratio", "workload": "python_trivial", "n": args.n,
                      "drover_over_dask": round(rates["drover"] / rates["dask"], 4)}), flush=True)


if __name__ == "__main__":
    main()
