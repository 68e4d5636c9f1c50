"""`python -m modtrack.collector serve` as users run it: ready line with real ports, SIGTERM, restart."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.collector_process import CollectorProcess
from harness.fake_rank import FakeRank, stream_steps
from harness.http import get


@pytest.mark.slow
def test_serve_ready_sigterm_and_restart(tmp_path):
    server = CollectorProcess(tmp_path / "data")
    try:
        assert not server.grpc_target.endswith(":0") and not server.url.endswith(":0")
        rank = FakeRank(server.grpc_target, "job", 0, 1)
        stream_steps([rank], range(5))
        rank.kill()
        assert server.terminate() == 0
    finally:
        server.kill()
    again = CollectorProcess(tmp_path / "data")
    try:
        status, body = get(again.url, "/api/v1/jobs/job/steps?last=10")
        assert status == 200 and [s["step"] for s in body["steps"]] == list(range(5))
        assert again.terminate() == 0
    finally:
        again.kill()


@pytest.mark.slow
def test_port_in_use_is_a_clear_error(tmp_path):
    server = CollectorProcess(tmp_path / "a")
    try:
        port = server.url.rsplit(":", 1)[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "modtrack.collector",
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(tmp_path / "b"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode != 0 and "error:" in out.stderr
    finally:
        server.kill()
