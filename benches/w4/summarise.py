#!/usr/bin/env python3
"""Summary tables (markdown) of a benches/w4/honest.sh results file and, if
given, its timeline summaries: per workload and system, the median makespan
and its spread (min-max), each pair's ratio to that pair's oracle run and their
median, retries and lost tasks; then booked against used memory.

Usage: summarise.py RESULTS.jsonl [RESULTS-timeline.jsonl]"""

import json
import statistics
import sys


def load(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        sys.exit("summarise.py: %s: %s" % (path, e))


def fmt(v, spec="%.2f"):
    return "-" if v is None else spec % v


def results_table(rows):
    print("| workload | system | mode | runs | median s | min-max s | x oracle per pair | median x oracle | retries | lost |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    oracle = {(r["workload"], r["pair"]): r["wall_s"] for r in rows
              if r["system"] == "oracle" and "wall_s" in r}
    keys = []
    for r in rows:
        k = (r["workload"], r["system"], r["mode"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        runs = [r for r in rows if (r["workload"], r["system"], r["mode"]) == k]
        ok = [r for r in runs if "wall_s" in r]
        failed = len(runs) - len(ok)
        walls = [r["wall_s"] for r in ok]
        ratios = [r["wall_s"] / oracle[(r["workload"], r["pair"])] for r in ok
                  if (r["workload"], r["pair"]) in oracle]
        print("| %s | %s | %s | %d%s | %s | %s | %s | %s | %d | %d |" % (
            k[0], k[1], k[2], len(ok), " (+%d failed)" % failed if failed else "",
            fmt(statistics.median(walls) if walls else None, "%.1f"),
            "%.1f-%.1f" % (min(walls), max(walls)) if walls else "-",
            ", ".join("%.2f" % x for x in ratios) or "-",
            fmt(statistics.median(ratios) if ratios else None),
            sum(r.get("retries", 0) for r in ok), sum(r.get("lost", 0) for r in ok)))


def timeline_table(rows):
    print("| workload | system | mode | runs | booked/used | idle booked MB·s | over booked MB·s | unbooked MB·s | retry attempts | retries' MB·s, at most |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = []
    for r in rows:
        k = (r["workload"], r["system"], r["mode"])
        if k not in keys:
            keys.append(k)

    def med(runs, key):
        v = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(v) if v else None

    for k in keys:
        runs = [r for r in rows if (r["workload"], r["system"], r["mode"]) == k]
        print("| %s | %s | %s | %d | %s | %s | %s | %s | %d | %s |" % (
            k[0], k[1], k[2], len(runs), fmt(med(runs, "booked_used_ratio")),
            fmt(med(runs, "idle_booked_mb_s"), "%.0f"), fmt(med(runs, "over_booked_mb_s"), "%.0f"),
            fmt(med(runs, "unbooked_mb_s"), "%.0f"),
            sum(r.get("retry_attempts", 0) for r in runs),
            fmt(med(runs, "retry_booked_mb_s_max"), "%.0f")))


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[-1])
    rows = load(sys.argv[1])
    if not rows:
        sys.exit("summarise.py: %s is empty" % sys.argv[1])
    results_table(rows)
    if len(sys.argv) == 3:
        tl = load(sys.argv[2])
        if tl:
            print()
            print("Memory booked against memory used (medians over runs; traces of oracle and drover):")
            print()
            timeline_table(tl)


if __name__ == "__main__":
    main()
