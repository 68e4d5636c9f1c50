"""`python -m collector serve` as users run it: ready line with real ports, SIGTERM, restart."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from test_collector_harness import FakeRank, get, stream_steps

READY = re.compile(r"modtrack collector ready grpc=(\S+) http=(\S+)")


class ServeProcess:
    def __init__(self, data_dir, *extra):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "collector", "serve", "--grpc-addr", "127.0.0.1:0",
             "--http-addr", "127.0.0.1:0", "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if READY.search(line):
                    found.set()
        threading.Thread(target=read, daemon=True).start()
        if not found.wait(30):
            self.proc.kill()
            raise AssertionError(f"no ready line: {self.lines} {self.proc.stderr.read()}")
        grpc_addr, http_addr = READY.search(self.lines[-1]).groups()
        self.grpc_target, self.url = grpc_addr, f"http://{http_addr}"

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.slow
def test_serve_ready_sigterm_and_restart(tmp_path):
    server = ServeProcess(tmp_path / "data")
    try:
        assert not server.grpc_target.endswith(":0") and not server.url.endswith(":0")
        rank = FakeRank(server.grpc_target, "job", 0, 1)
        stream_steps([rank], range(5))
        rank.kill()
        assert server.terminate() == 0
    finally:
        server.kill()
    again = ServeProcess(tmp_path / "data")
    try:
        status, body = get(again.url, "/api/v1/jobs/job/steps?last=10")
        assert status == 200 and [s["step"] for s in body["steps"]] == list(range(5))
        assert again.terminate() == 0
    finally:
        again.kill()


@pytest.mark.slow
def test_port_in_use_is_a_clear_error(tmp_path):
    server = ServeProcess(tmp_path / "a")
    try:
        port = server.url.rsplit(":", 1)[1]
        out = subprocess.run([sys.executable, "-m", "collector", "serve", "--grpc-addr",
                              "127.0.0.1:0", "--http-addr", f"127.0.0.1:{port}", "--data-dir",
                              str(tmp_path / "b")], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and "error:" in out.stderr
    finally:
        server.kill()


def test_collector_never_imports_torch():
    code = ("import sys, collector.serve, collector.__main__; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
