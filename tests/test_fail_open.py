"""Fail-open on real torchrun ranks: a stalled collector costs training nothing, and a collector
killed and restarted on the same data dir ends up with every step, replayed ones included,
none twice. (Never started and killed without restart: tests/test_end_to_end.py.)"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from test_fail_open_harness import REPO, CollectorProcess, env, free_port

pytestmark = pytest.mark.slow

TRAIN = os.path.join(REPO, "examples", "train.py")
SMALL = ["--dim", "32", "--heads", "2", "--layers", "2", "--context", "16", "--batch", "4",
         "--vocab", "64", "--log-every", "1"]


def torchrun(target: str, job: str, steps: int, *train_args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "modtrack.agent", "--collector", target, "--job", job, TRAIN, "--steps", str(steps),
         *SMALL, *train_args],
        cwd=REPO, env=env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)  # its own process group: the ranks die with it


class StalledServer:
    """Accepts TCP connections and never reads a byte: a hung collector host."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        try:
            while True:
                conn, _ = self.sock.accept()
                self.held.append(conn)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def finish(proc: subprocess.Popen, timeout: float = 150) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"training did not finish within {timeout} s: it hung") from None
    finally:
        kill_group(proc)


def test_stalled_collector_costs_training_nothing(tmp_path):
    server = StalledServer()
    try:
        started = time.monotonic()
        out, err = finish(torchrun(f"127.0.0.1:{server.port}", "stalled", 20))
        took = time.monotonic() - started
    finally:
        server.close()
    assert "done" in out and "step 19 " in out, err[-3000:]
    assert server.held, "the agent never even connected"
    assert err.count("modtrack:") <= 4, err  # a line or two per rank, no flood
    assert took < 90, took  # no connect or flush wait piles up on the training


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def test_killed_and_restarted_collector_gets_every_step_once(tmp_path):
    port, steps = free_port(), 400
    data, log = tmp_path / "data", tmp_path / "collector.log"
    server = CollectorProcess(data, log, "--watermark-s", "0.3", grpc_port=port)
    printed: list[int] = []
    # every step lasts at least 20 ms on both ranks (DDP waits for the slow one): time to restart
    proc = torchrun(f"127.0.0.1:{port}", "restart", steps, "--slow-rank", "0", "--slow-ms", "20")
    out_lines: list[str] = []

    def read():
        for line in proc.stdout:
            out_lines.append(line)
            if line.startswith("step "):
                printed.append(int(line.split()[1]))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            jobs = get_json(f"http://{server.http_addr}/api/v1/jobs")["jobs"]
            if jobs and (jobs[0]["last_step"] or 0) >= 20:
                break
            time.sleep(0.1)
        server.kill()
        killed_at = printed[-1]
        while proc.poll() is None and printed[-1] < killed_at + 30:  # steps while it is down
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before the collector came back"
        server = CollectorProcess(data, log, "--watermark-s", "0.3", grpc_port=port)
        restarted_at = printed[-1]
        _, err = finish(proc)
        reader.join(10)
        assert proc.returncode == 0, err[-3000:]
        url = f"http://{server.http_addr}/api/v1/jobs/restart/steps?last={steps + 10}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = get_json(url)["steps"]
            if len(got) == steps:
                break
            time.sleep(0.3)
        have = {s["step"]: sorted(r["rank"] for r in s["ranks"]) for s in got}
        missing = [s for s in range(steps) if have.get(s) != [0, 1]]
        assert not missing, (f"killed at {killed_at}, back at {restarted_at}; missing or doubled "
                             f"{missing[:20]} of {len(missing)}; {err[-2000:]}")
        assert killed_at < restarted_at < steps - 1
    finally:
        kill_group(proc)
        server.kill()
