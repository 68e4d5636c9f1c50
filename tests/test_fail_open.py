"""Fail-open on real torchrun ranks: a stalled collector costs training nothing, and a collector
killed and restarted on the same data dir ends up with every step, replayed ones included,
none twice. (Never started and killed without restart: tests/test_end_to_end.py.)"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from harness.collector_process import CollectorProcess
from harness.http import get_json
from harness.ports import free_port
from harness.stalled_server import StalledServer
from harness.torchrun import TRAIN, end, finish, start, torchrun_cmd
from harness.waiting import wait_for

pytestmark = pytest.mark.slow

SMALL = [
    "--dim",
    "32",
    "--heads",
    "2",
    "--layers",
    "2",
    "--context",
    "16",
    "--batch",
    "4",
    "--vocab",
    "64",
    "--log-every",
    "1",
]


def torchrun(target: str, job: str, steps: int, *train_args: str) -> subprocess.Popen:
    cmd = torchrun_cmd(
        2,
        "-m",
        "modtrack.agent",
        "--collector",
        target,
        "--job",
        job,
        TRAIN,
        "--steps",
        str(steps),
        *SMALL,
        *train_args,
    )
    return start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_stalled_collector_costs_training_nothing(tmp_path):
    server = StalledServer()
    try:
        started = time.monotonic()
        out, err = finish(torchrun(f"127.0.0.1:{server.port}", "stalled", 20), 150)
        took = time.monotonic() - started
    finally:
        server.close()
    assert "done" in out and "step 19 " in out, err[-3000:]
    assert server.held, "the agent never even connected"
    assert err.count("modtrack:") <= 4, err  # a line or two per rank, no flood
    assert took < 90, took  # no connect or flush wait piles up on the training


def test_killed_and_restarted_collector_gets_every_step_once(tmp_path):
    port, steps = free_port(), 400
    data, log = tmp_path / "data", tmp_path / "collector.log"
    server = CollectorProcess(data, "--watermark-s", "0.3", log_path=log, grpc_port=port)
    printed: list[int] = []
    # every step lasts at least 20 ms on both ranks (DDP waits for the slow one): time to restart
    proc = torchrun(f"127.0.0.1:{port}", "restart", steps, "--slow-rank", "0", "--slow-ms", "20")
    out_lines: list[str] = []

    def read():
        for line in proc.stdout:
            out_lines.append(line)
            if line.startswith("step "):
                printed.append(int(line.split()[1]))

    def training() -> bool:
        assert proc.poll() is None, f"training ended early (exit {proc.returncode}): {out_lines[-5:]}"
        return True

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:

        def reported_20_steps():
            jobs = training() and get_json(f"{server.url}/api/v1/jobs")["jobs"]
            return jobs and (jobs[0]["last_step"] or 0) >= 20

        wait_for(reported_20_steps, 120, "the collector to hold 20 steps")
        server.kill()
        killed_at = printed[-1]
        # steps while it is down
        wait_for(lambda: training() and printed[-1] >= killed_at + 30, 120, "30 steps with the collector down")
        server = CollectorProcess(data, "--watermark-s", "0.3", log_path=log, grpc_port=port)
        restarted_at = printed[-1]
        _, err = finish(proc, 150)
        reader.join(10)
        assert proc.returncode == 0, err[-3000:]
        url = f"{server.url}/api/v1/jobs/restart/steps?last={steps + 10}"

        def all_stored():
            stored = get_json(url)["steps"]
            return stored if len(stored) == steps else None

        got = wait_for(all_stored, 30, lambda: f"all {steps} steps stored: {len(get_json(url)['steps'])}")
        have = {s["step"]: sorted(r["rank"] for r in s["ranks"]) for s in got}
        missing = [s for s in range(steps) if have.get(s) != [0, 1]]
        assert not missing, (
            f"killed at {killed_at}, back at {restarted_at}; missing or doubled "
            f"{missing[:20]} of {len(missing)}; {err[-2000:]}"
        )
        assert killed_at < restarted_at < steps - 1
    finally:
        end(proc)
        server.kill()
