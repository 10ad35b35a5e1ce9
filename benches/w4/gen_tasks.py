#!/usr/bin/env python3
"""Writes W4's task list (BRIEF section 6): N lines "X_MB T_S", seeded, so that
every system in benches/w4/run.sh runs exactly the same tasks.
X is bimodal: 70% uniform in 300-600 MB, 30% in 2,500-4,000 MB; T uniform in 1-2 s."""
import random
import sys

n = int(sys.argv[1]) if len(sys.argv) > 1 else 120
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 4
rng = random.Random(seed)
for _ in range(n):
    x = rng.randint(300, 600) if rng.random() < 0.7 else rng.randint(2500, 4000)
    t = round(rng.uniform(1.0, 2.0), 2)
    print(x, t)
