"""Shared test set-up and fixtures. The helpers behind them live in tests/harness/."""

import os
import sys

import pytest

from harness.browser import chromium
from harness.collector_thread import CollectorThread
from harness.fake_collector import FakeCollectorServers

# The tests run as in an activated virtual environment: console scripts (modtrack-agent,
# modtrack-collector) and torchrun --no-python find the installed commands on PATH.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture
def collector(tmp_path):
    """A real collector in this process (harness.collector_thread), its data dir in tmp_path."""
    c = CollectorThread(tmp_path / "data")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def serve():
    """serve(FakeCollector(), port=None) -> (server, port): an in-test gRPC collector on loopback."""
    servers = FakeCollectorServers()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def browser():
    """A real headless Chromium (selenium driver); the test is skipped where Chromium cannot run."""
    with chromium() as driver:
        yield driver
