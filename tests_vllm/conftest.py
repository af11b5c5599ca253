"""Fixtures for vLLM's own queue tests, run against shmcast's MessageQueue (make test-vllm).

This file is copied next to the test files extracted from vLLM's source distribution, in a
scratch directory.  It supplies what those files need from vLLM's own conftest (which brings in
much more): the ``caplog_vllm`` fixture.  And it checks, before any test runs, that the shmcast
plugin is active, so that every MessageQueue the tests build is shmcast's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

SHM_BROADCAST = "vllm.distributed.device_communicators.shm_broadcast"


def pytest_configure(config: pytest.Config) -> None:
    import importlib

    module = importlib.import_module(SHM_BROADCAST)  # loads the plugin (sitecustomize hook)
    owner = module.MessageQueue.__module__
    if os.environ.get("SHMCAST_VLLM_EXPECT", "shmcast") == "shmcast":
        if not owner.startswith("shmcast."):
            raise pytest.UsageError(
                f"vLLM's MessageQueue is still {owner}'s: the shmcast plugin is not active"
            )
    elif owner.startswith("shmcast."):
        raise pytest.UsageError("the shmcast plugin is active, but vLLM's own class was asked for")


@pytest.fixture
def caplog_vllm(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """``caplog`` that also sees records of the ``vllm`` loggers, whatever their propagation."""
    logger = logging.getLogger("vllm")
    logger.addHandler(caplog.handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
