"""Parsl test-suite configuration: one local drover worker of 2 cores
(``pytest --pyargs parsl.tests --config python/ci/drover_config.py``)."""

from parsl.config import Config

from drover.parsl import DroverExecutor


def fresh_config():
    return Config(executors=[DroverExecutor(label="drover", local_workers=1, worker_cores=2)],
                  strategy="none")
