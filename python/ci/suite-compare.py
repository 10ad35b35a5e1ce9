#!/usr/bin/env python3
"""Parsl's config-agnostic test suite with htex_local and with the drover
config, in one script on one machine, runs interleaved (htex, drover,
htex, ...), and per-test times compared.

    python3 python/ci/suite-compare.py [--reps N] [--json OUT.jsonl] [-k EXPR]

Needs the drover package importable, DROVER_BIN (or `drover` on PATH),
Parsl, and pytest 7 in PARSL_SUITE_PYTEST_DIR (python/ci/parsl-suite.sh
installs it). Each run writes a JUnit XML file; a test's time there is its
setup, call and teardown together (so the executor's start lands on the
first test and its stop on the last, as for HTEX). The summary compares
the tests that passed on both configs; it also lists every test that
passed with htex_local and not with drover.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest7_dir():
    return os.environ.get("PARSL_SUITE_PYTEST_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "drover-parsl-suite-pytest7")


def run_suite(config, select, python, timeout):
    """Runs the suite once; returns ({test: (outcome, seconds)}, wall seconds)."""
    import parsl

    tests = os.path.join(os.path.dirname(parsl.__file__), "tests")
    pt = pytest7_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pt, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="parsl-suite-") as cwd:
        xml = os.path.join(cwd, "junit.xml")
        start = time.monotonic()
        p = subprocess.run([python, "-m", "pytest", tests, "--config", config, "-k", select,
                            "-p", "no:cacheprovider", "-q", "--junitxml", xml],
                           cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout)
        wall = time.monotonic() - start
        if not os.path.exists(xml):
            raise RuntimeError("pytest wrote no JUnit file (exit %d):\n%s" % (p.returncode, p.stdout[-4000:]))
        return parse_junit(xml), wall


def parse_junit(path):
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        # The class name carries the rootdir, which follows the config's
        # path: keep what follows parsl.tests.
        classname = case.get("classname", "").rsplit("parsl.tests.", 1)[-1]
        name = "%s::%s" % (classname, case.get("name", ""))
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                break
            if child.tag == "skipped":
                outcome = "skipped"
        out[name] = (outcome, float(case.get("time") or 0.0))
    return out


def summarise(runs):
    """Per config: the median over reps of each test's time and its outcome in every rep."""
    tests = {}
    for res in runs:
        for name, (outcome, t) in res.items():
            o, times = tests.setdefault(name, ([], []))
            o.append(outcome)
            times.append(t)
    return {n: (o, statistics.median(ts)) for n, (o, ts) in tests.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=1, help="runs of each config, interleaved")
    ap.add_argument("-k", dest="select", default="not cleannet", help="pytest -k expression for both configs")
    ap.add_argument("--json", help="append the summary as one JSON line to this file")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for one suite run")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be at least 1")

    import parsl

    configs = {
        "htex_local": os.path.join(os.path.dirname(parsl.__file__), "tests", "configs", "htex_local.py"),
        "drover": os.path.join(HERE, "drover_config.py"),
    }
    runs = {k: [] for k in configs}
    walls = {k: [] for k in configs}
    for rep in range(args.reps):
        for label, config in configs.items():
            res, wall = run_suite(config, args.select, sys.executable, args.timeout)
            runs[label].append(res)
            walls[label].append(wall)
            counts = {o: sum(1 for v in res.values() if v[0] == o) for o in ("passed", "failed", "skipped")}
            print("rep %d %-10s wall %6.1f s  %s" % (rep + 1, label, wall, counts), flush=True)

    htex, drov = summarise(runs["htex_local"]), summarise(runs["drover"])

    def always(o):
        return all(x == "passed" for x in o)

    both = sorted(n for n in htex if n in drov and always(htex[n][0]) and always(drov[n][0]))
    sum_h = sum(htex[n][1] for n in both)
    sum_d = sum(drov[n][1] for n in both)
    ratios = sorted(drov[n][1] / max(htex[n][1], 1e-3) for n in both)
    regressions = sorted(n for n in htex if always(htex[n][0]) and not (n in drov and always(drov[n][0])))
    print("\ntests passed on both: %d; summed time htex_local %.1f s, drover %.1f s: %.2fx"
          % (len(both), sum_h, sum_d, sum_d / max(sum_h, 1e-9)))
    if ratios:
        print("median per-test ratio drover/htex: %.2fx" % statistics.median(ratios))
    print("passed with htex_local, not with drover (%d):" % len(regressions))
    for n in regressions:
        print("  %s  (drover: %s)" % (n, ",".join(drov[n][0]) if n in drov else "not run"))
    slow = sorted(both, key=lambda n: drov[n][1] - htex[n][1], reverse=True)[:10]
    print("largest extra time on drover:")
    for n in slow:
        print("  %+7.2f s  %s (htex %.2f s, drover %.2f s)" % (drov[n][1] - htex[n][1], n, htex[n][1], drov[n][1]))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({
                "reps": args.reps, "select": args.select, "tests_both": len(both),
                "sum_htex_s": round(sum_h, 2), "sum_drover_s": round(sum_d, 2),
                "ratio": round(sum_d / max(sum_h, 1e-9), 3),
                "median_test_ratio": round(statistics.median(ratios), 3) if ratios else None,
                "wall_htex_s": [round(w, 1) for w in walls["htex_local"]],
                "wall_drover_s": [round(w, 1) for w in walls["drover"]],
                "regressions": regressions,
                "per_test": {n: [round(htex[n][1], 3), round(drov[n][1], 3)] for n in both},
            }) + "\n")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
