"""Issue 17, call runners: 10,000 trivial calls through drover.Executor (one
local worker of 2 slots) with this build's worker (call runners), the same
build with runners off (DROVER_CALL_RUNNERS=0: a fork per call), and a
"before" binary (main's release drover at the start of the round), next to
Parsl HTEX and Dask with 2 workers each, in one run, alternating, medians.

    AFTER=target/release/drover BEFORE=/work/r5-before/drover \\
        python3 benches/calls/runners_compare.py --n 10000 --reps 3

Uses python/bench/functions_compare.py's systems; the drover Python package
is the one installed (the master side, which this change does not touch).
"""

import argparse
import json
import os
import statistics
import sys

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python", "bench")
sys.path.insert(0, BENCH)
# Workers of every system import the calls' module by name.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [BENCH, os.environ.get("PYTHONPATH")]))
import functions_compare as fc  # noqa: E402


def drover_with(binary, runners=True):
    def run(n):
        saved = dict(os.environ)
        os.environ["DROVER_BIN"] = binary
        if not runners:
            os.environ["DROVER_CALL_RUNNERS"] = "0"
        try:
            return fc.drover_executor(n)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    after = os.path.abspath(os.environ.get("AFTER", "target/release/drover"))
    before = os.environ.get("BEFORE")
    plan = [("drover, call runners (after)", drover_with(after))]
    if before:
        plan.append(("drover, before (main's binary)", drover_with(os.path.abspath(before))))
    plan += [
        ("drover, same build, runners off", drover_with(after, runners=False)),
        ("Parsl HTEX, 2 workers", fc.parsl_htex),
        ("Dask LocalCluster, 2 x 1 thread", fc.dask),
    ]
    rates = {name: [] for name, _ in plan}
    for rep in range(args.reps):
        for name, fn in (plan if rep % 2 == 0 else plan[::-1]):
            wall = fn(args.n)
            rates[name].append(args.n / wall)
            print(json.dumps({"system": name, "rep": rep, "calls_per_s": round(args.n / wall, 1),
                              "load": os.getloadavg()[0]}), flush=True)
    med = {name: statistics.median(r) for name, r in rates.items()}
    htex, dask = med["Parsl HTEX, 2 workers"], med["Dask LocalCluster, 2 x 1 thread"]
    print("\n| system | calls/s median (reps) | ÷ HTEX | ÷ Dask |\n|---|---:|---:|---:|")
    for name, r in rates.items():
        print("| %s | %.0f (%s) | %.2fx | %.2fx |" % (
            name, med[name], ", ".join("%.0f" % x for x in r), med[name] / htex, med[name] / dask))


if __name__ == "__main__":
    main()
