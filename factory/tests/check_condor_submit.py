"""Checks a submit description written by `drover factory --batch condor
--dry-run` with HTCondor's own parser (the PyPI `htcondor` bindings).

No HTCondor pool can run where drover is tested, so this is what stands in
for condor_submit: the description must parse, and the values HTCondor reads
from it must be the worker's size, command and files.

usage: check_condor_submit.py FILE DROVER_BINARY PASSWORD_FILE shared|transfer
"""

import os
import sys

try:
    import htcondor2 as htcondor  # htcondor >= 24 ships only the v2 bindings
except ImportError:
    import htcondor


def main():
    path, drover, password, mode = sys.argv[1:5]
    with open(path) as f:
        sub = htcondor.Submit(f.read())
    failures = []

    def want(key, expected):
        got = sub.get(key)
        if got != expected:
            failures.append(f"{key}: expected {expected!r}, got {got!r}")

    shared = mode == "shared"
    want("universe", "vanilla")
    want("executable", drover)
    want("batch_name", "drover-factory-condor-test")
    want("request_cpus", "4")
    want("request_memory", "8000")
    want("request_disk", str(2000 * 1024))
    want("request_gpus", "1")
    want("allowed_job_duration", "3600")
    want("transfer_executable", "False" if shared else "True")
    want("should_transfer_files", "IF_NEEDED" if shared else "YES")
    want("requirements", '(OpSys == "LINUX")')
    want("MY.ProjectName", '"drover"')
    want("MY.DroverFactory", '"drover-factory-condor-test"')
    if shared:
        if sub.get("transfer_input_files") is not None:
            failures.append("a shared path must not ship the password file")
    else:
        want("transfer_input_files", password)
    if str(sub.getQArgs()).strip() != "1":
        failures.append(f"queue: expected 1, got {sub.getQArgs()!r}")
    args = sub.expand("arguments")
    # The job sees the shipped password file in its scratch directory under
    # its own name; with a shared path, at its absolute path. Either has a
    # space here, so it must be single-quoted inside the argument string.
    pw_arg = password if shared else os.path.basename(password)
    expected = (
        '"worker node1.example.org:9123 --cores 4 --memory 8000 --disk 2000 '
        f"--gpus 1 --idle-timeout 120 --password-file '{pw_arg}'\""
    )
    if args != expected:
        failures.append(f"arguments: expected {expected!r}, got {args!r}")
    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print(f"htcondor {htcondor.version()}: description parses and matches ({mode})")


main()
