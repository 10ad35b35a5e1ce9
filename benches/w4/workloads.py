#!/usr/bin/env python3
"""Task lists for benches/w4/honest.sh: one line per task, "X_MB T_S" (the task
sleeps T s holding X MB, one core) or "X_MB T_S C" (C threads spin for T s),
seeded, so every system runs exactly the same tasks.

Usage: workloads.py NAME [N] [SEED] [MEM_SCALE]
  w4      W4 (BRIEF section 6), as gen_tasks.py: 70% X in 300-600 MB, 30% in 2,500-4,000
  modes3  three well-separated modes: 40% 150-250 MB, 35% 1,200-1,500, 25% 3,200-3,800
  tail    a heavy tail: X = 300 MB x Pareto(alpha 1.3), capped at 8,000 (median ~550 MB)
  grow    memory that grows with the task's parameter: task i (0-based) of N takes
          X = 200 + 3,600 (i / (N - 1))^2 MB, submitted in order, so what the
          category learns early is too small later
  cores   cores vary with memory: C in {1, 2, 4} (50/30/20%), X = C x 300-900 MB,
          C threads spin for T s (real CPU), T in 1-2 s
MEM_SCALE (default 1) multiplies every X (e.g. 0.1 to try the harness on a small
machine); T is never scaled."""
import random
import sys

NAMES = ("w4", "modes3", "tail", "grow", "cores")


def time(rng):
    return round(rng.uniform(1.0, 2.0), 2)


def tasks(name, n, seed):
    """Yields (x_mb, t_s, cores or None) for workload `name`."""
    rng = random.Random(seed)
    for i in range(n):
        # Memory is drawn before time, as in gen_tasks.py, so W4 is the same list.
        if name == "w4":
            yield rng.randint(300, 600) if rng.random() < 0.7 else rng.randint(2500, 4000), time(rng), None
        elif name == "modes3":
            u = rng.random()
            if u < 0.40:
                x = rng.randint(150, 250)
            elif u < 0.75:
                x = rng.randint(1200, 1500)
            else:
                x = rng.randint(3200, 3800)
            yield x, time(rng), None
        elif name == "tail":
            yield min(8000, int(300 * rng.paretovariate(1.3))), time(rng), None
        elif name == "grow":
            frac = i / (n - 1) if n > 1 else 0.0
            yield int(200 + 3600 * frac * frac), time(rng), None
        elif name == "cores":
            u = rng.random()
            c = 1 if u < 0.5 else (2 if u < 0.8 else 4)
            yield c * rng.randint(300, 900), time(rng), c
        else:
            raise ValueError(name)


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        sys.exit("usage: workloads.py {%s} [N] [SEED] [MEM_SCALE]" % "|".join(NAMES))
    name = sys.argv[1]
    try:
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 120
        seed = int(sys.argv[3]) if len(sys.argv) > 3 else 4
        scale = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    except ValueError as e:
        sys.exit("workloads.py: %s" % e)
    if n < 1 or scale <= 0:
        sys.exit("workloads.py: N must be at least 1 and MEM_SCALE above 0")
    for x, t, c in tasks(name, n, seed):
        x = max(1, int(round(x * scale)))
        print("%d %s" % (x, t) if c is None else "%d %s %d" % (x, t, c))


if __name__ == "__main__":
    main()
