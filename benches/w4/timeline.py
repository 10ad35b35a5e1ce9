#!/usr/bin/env python3
"""Where does the time go: memory booked against memory used through one run
of benches/w4/honest.sh (or master/benches/w4.rs --trace, or oracle.py --trace).

Reads PREFIX.tasks.jsonl (drover's TaskResult lines, or oracle.py's records)
and, when there, PREFIX.samples.csv (booked on the master and resident under
the worker, sampled). Writes PREFIX.timeline.csv, one row per task start or
end per worker: t_s, host, booked_mb (the final allocations of the tasks
running), peak_mb (their measured peaks), running. Prints one JSON line:

  booked_used_ratio   integral of booked over integral of used (samples), i.e.
                      how many MB were held per MB really resident; 0 when
                      nothing was booked (tasks that declared no memory)
  idle_booked_mb_s    integral of max(0, booked - used): held, not used
  unbooked_mb_s       integral of max(0, worker - booked): free room
  over_booked_mb_s    integral of max(0, used - booked): used beyond bookings
  final_booked_mb_s   sum over tasks of final allocation x last attempt's run
  final_peak_mb_s     sum over tasks of measured peak x last attempt's run
  retry_attempts, retry_booked_mb_s_max  failed attempts, and an upper bound on
                      what they held: each task's largest earlier allocation x
                      (its last start - its submit); drover's attempts carry
                      no times, so nothing closer can be said from its results
Usage: timeline.py PREFIX [--worker-mb 12000]"""

import argparse
import csv
import json
import os
import sys


def since_epoch(v):
    """Seconds from drover's SystemTime serialization (or a plain number)."""
    if isinstance(v, dict):
        return v["secs_since_epoch"] + v["nanos_since_epoch"] / 1e9
    return float(v)


def normalise(rec):
    """{host, alloc_mb, start, end, peak_mb, submitted, earlier: [alloc MB]}."""
    if "alloc_mb" in rec:  # oracle.py
        return {"host": rec["host"], "alloc_mb": rec["alloc_mb"], "start": rec["start_s"],
                "end": rec["end_s"], "peak_mb": rec["peak_mb"], "submitted": 0.0,
                "earlier": []}
    end = since_epoch(rec["finished"])
    wall = rec.get("measured", {}).get("wall_time_s", 0.0) or 0.0
    attempts = rec.get("attempts", [])
    return {"host": rec.get("host") or "?", "alloc_mb": rec["allocated"]["memory_mb"],
            "start": end - wall, "end": end, "peak_mb": rec["measured"]["memory_mb"],
            "submitted": since_epoch(rec["submitted"]),
            "earlier": [a["allocation"]["memory_mb"] for a in attempts[:-1]]}


def integrate(rows, worker_mb):
    """Left-rectangle integrals over the sampled rows."""
    out = dict(booked=0.0, used=0.0, idle=0.0, unbooked=0.0, over=0.0, seconds=0.0)
    for a, b in zip(rows, rows[1:]):
        dt = b["t"] - a["t"]
        out["booked"] += a["booked"] * dt
        out["used"] += a["used"] * dt
        out["idle"] += max(0.0, a["booked"] - a["used"]) * dt
        out["unbooked"] += max(0.0, worker_mb - a["booked"]) * dt
        out["over"] += max(0.0, a["used"] - a["booked"]) * dt
        out["seconds"] += dt
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prefix")
    ap.add_argument("--worker-mb", type=float, default=12000)
    a = ap.parse_args()
    try:
        with open(a.prefix + ".tasks.jsonl") as f:
            tasks = [normalise(json.loads(line)) for line in f if line.strip()]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit("timeline.py: %s.tasks.jsonl: %s" % (a.prefix, e))
    if not tasks:
        sys.exit("timeline.py: %s.tasks.jsonl has no tasks" % a.prefix)
    t0 = min(min(t["start"], t["submitted"] or t["start"]) for t in tasks)

    events = []
    for t in tasks:
        events.append((t["start"] - t0, t["host"], t["alloc_mb"], t["peak_mb"], 1))
        events.append((t["end"] - t0, t["host"], -t["alloc_mb"], -t["peak_mb"], -1))
    events.sort(key=lambda e: (e[0], e[4]))
    state = {}
    with open(a.prefix + ".timeline.csv", "w") as f:
        f.write("t_s,host,booked_mb,peak_mb,running\n")
        for t, host, mb, peak, n in events:
            s = state.setdefault(host, [0.0, 0.0, 0])
            s[0] += mb
            s[1] += peak
            s[2] += n
            f.write("%.3f,%s,%.0f,%.0f,%d\n" % (t, host, s[0], max(0.0, s[1]), s[2]))

    summary = {"prefix": os.path.basename(a.prefix), "tasks": len(tasks),
               "final_booked_mb_s": round(sum(t["alloc_mb"] * (t["end"] - t["start"]) for t in tasks)),
               "final_peak_mb_s": round(sum(t["peak_mb"] * (t["end"] - t["start"]) for t in tasks)),
               "retry_attempts": sum(len(t["earlier"]) for t in tasks),
               "retry_booked_mb_s_max": round(sum(
                   max(t["earlier"]) * max(0.0, t["start"] - t["submitted"])
                   for t in tasks if t["earlier"]))}
    samples = a.prefix + ".samples.csv"
    if os.path.exists(samples):
        with open(samples) as f:
            rows = [{"t": float(r["t_s"]), "booked": float(r["booked_mb"]),
                     "used": float(r["used_mb"])} for r in csv.DictReader(f)]
        i = integrate(rows, a.worker_mb)
        summary.update({
            "sampled_s": round(i["seconds"], 2),
            "booked_used_ratio": round(i["booked"] / i["used"], 3) if i["used"] else None,
            "booked_mb_s": round(i["booked"]), "used_mb_s": round(i["used"]),
            "idle_booked_mb_s": round(i["idle"]), "unbooked_mb_s": round(i["unbooked"]),
            "over_booked_mb_s": round(i["over"]),
        })
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
