"""Fixtures: real `drover worker` processes connected to a real Manager.

The drover binary comes from $DROVER_BIN, else `drover` on PATH, else
target/debug/drover of this repository (built by `cargo build --bin drover`).
"""

import os
import pathlib

import pytest

import drover

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def drover_bin():
    if not os.environ.get("DROVER_BIN"):
        try:
            drover.find_drover()
        except FileNotFoundError:
            candidate = REPO / "target" / "debug" / "drover"
            if not candidate.exists():
                pytest.fail("no drover binary: set DROVER_BIN or run `cargo build --bin drover`")
            os.environ["DROVER_BIN"] = str(candidate)
    return drover.find_drover()


def _one_worker(cores):
    m = drover.Manager(port=0)
    m.local_workers(1, cores=cores)
    return m


@pytest.fixture
def manager():
    m = _one_worker(2)
    yield m
    m.shutdown()


@pytest.fixture
def one_slot():
    """One worker with one slot: consecutive calls share one call runner."""
    m = _one_worker(1)
    yield m
    m.shutdown()


def wait_all(m, timeout=120):
    """Every result until the manager is empty; fails instead of hanging."""
    out = {}
    while not m.empty():
        r = m.wait(timeout)
        assert r is not None, "no result within %s s" % timeout
        out[r.id] = r
    return out
