"""Harness for the reliability and security tests (no tests here): a real `python -m
collector serve` subprocess on a fixed or free port (so an agent can outlive a restart), its
log in a file to grep, and kill -9 / SIGTERM that always end it."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = re.compile(r"modtrack collector ready grpc=(\S+) http=(\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    """The test's environment for subprocesses: this checkout importable, no stray settings."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("MODTRACK_")}
    out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
    out.update(extra)
    return out


class CollectorProcess:
    def __init__(self, data_dir, log_path, *extra, grpc_port: int = 0, timeout: float = 30):
        self.log_path = log_path
        self._log = open(log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modtrack.collector", "serve", "--grpc-addr", f"127.0.0.1:{grpc_port}",
             "--http-addr", "127.0.0.1:0", "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env(), cwd=REPO)
        found = threading.Event()
        self.lines: list[str] = []

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if READY.search(line):
                    found.set()
        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout):
            self.kill()
            raise AssertionError(f"collector not ready: {self.lines} {self.log()}")
        grpc_addr, http_addr = READY.search("".join(self.lines)).groups()
        self.grpc_target = grpc_addr
        self.http_addr = http_addr

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def kill(self) -> None:
        """kill -9: no flush, no goodbye."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
