"""Runs one pickled Python call: ``python3 remote.py CALL_FILE RESULT_FILE``.

This file is shipped to workers as a task input, so it must stay pure
Python with no import of the ``drover`` package: the worker's interpreter
only needs ``cloudpickle`` (and whatever the function itself imports).

CALL_FILE holds ``cloudpickle.dumps((fn, args, kwargs))``. RESULT_FILE gets
``("ok", value)`` or ``("err", exception_or_None, traceback_text,
type_name, message)``. The exit status is 1 when the call raised. The
worker's function server (forkserver.py) runs calls through `run_bytes`.
"""

import pickle
import sys
import traceback


def _error_payload(exc, tb_text):
    """The error tuple, with the exception object only if it survives pickling."""
    import cloudpickle

    name = type(exc).__module__ + "." + type(exc).__qualname__
    message = str(exc)
    try:
        blob = cloudpickle.dumps(exc)
        pickle.loads(blob)
        kept = exc
    except Exception:
        kept = None
    return ("err", kept, tb_text, name, message)


def run_bytes(call):
    """Runs the pickled call `call`; returns (raised, pickled outcome)."""
    try:
        import cloudpickle
    except ImportError as e:
        payload = ("err", None, traceback.format_exc(), "ImportError",
                   "the worker's Python has no cloudpickle: %s (%s)" % (e, sys.executable))
        return True, pickle.dumps(payload)
    try:
        fn, args, kwargs = cloudpickle.loads(call)
        payload = ("ok", fn(*args, **kwargs))
    except BaseException as e:  # the caller decides; KeyboardInterrupt included
        payload = _error_payload(e, traceback.format_exc())
    try:
        data = cloudpickle.dumps(payload)
    except Exception as e:
        # The value itself would not pickle: report that as the error.
        payload = _error_payload(
            TypeError("the function's return value cannot be pickled: %s" % e),
            traceback.format_exc(),
        )
        data = cloudpickle.dumps(payload)
    return payload[0] == "err", data


def run(call_path, result_path):
    """Loads the call from a file, runs it, and writes the outcome; returns
    the exit status: 0 when it returned, 1 when it raised."""
    with open(call_path, "rb") as f:
        call = f.read()
    raised, data = run_bytes(call)
    with open(result_path, "wb") as f:
        f.write(data)
    return 1 if raised else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write("usage: remote.py CALL_FILE RESULT_FILE\n")
        return 2
    return run(argv[0], argv[1])


if __name__ == "__main__":
    sys.exit(main())
