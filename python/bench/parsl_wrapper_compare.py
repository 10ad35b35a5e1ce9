"""functions_compare.py with one more system: Parsl through DroverExecutor
shipping Parsl's ``wrap_error`` wrapper with every call, as DroverExecutor
did before it left the wrapper out (the function server then imports all of
Parsl, and each call's fork copies that bigger process). Same options as
functions_compare.py; run from the repository root with python/bench on
PYTHONPATH (so HTEX's workers can import the benchmark's function):

    PYTHONPATH=python/bench DROVER_BIN=target/release/drover \\
        python3 python/bench/parsl_wrapper_compare.py --n 10000 --reps 3 \\
        --only HTEX --only "Parsl +" --only "drover.Executor (local, 2 slots)"
"""

import functions_compare as fc


def parsl_drover_wrapper_shipped(n):
    import drover.parsl as dp

    keep = dp.unwrap_errors
    dp.unwrap_errors = lambda func: func
    try:
        return fc.parsl_drover(n)
    finally:
        dp.unwrap_errors = keep


fc.SYSTEMS["Parsl + DroverExecutor, wrapper shipped (main)"] = parsl_drover_wrapper_shipped

if __name__ == "__main__":
    fc.main()
