"""`python -m modtrack.collector serve` as users run it, in a subprocess: on free loopback ports (or a
fixed gRPC port, so that agents outlive a restart), ready once it prints its ready line with the real
ports, its log in a file to grep, and kill -9 / SIGTERM that always end it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from harness.http import get_json

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY = re.compile(r"modtrack collector ready grpc=(\S+) http=(\S+)")


def env(**extra) -> dict:
    """The test's environment for subprocesses: this checkout importable, no stray MODTRACK_ settings."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("MODTRACK_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, out.get("PYTHONPATH")]))
    out.update(extra)
    return out


class CollectorProcess:
    """The collector command; `extra` are more serve flags. The log goes to `log_path` (default: beside
    the data dir). Use as a context manager, or end it with terminate() / kill()."""

    def __init__(
        self,
        data_dir,
        *extra: str,
        log_path=None,
        grpc_port: int = 0,
        timeout: float = 30,
        command: list[str] | None = None,
    ):
        """`command` replaces `python -m modtrack.collector` (e.g. the same module under a guard)."""
        data_dir = Path(data_dir)
        self.log_path = Path(log_path) if log_path else data_dir.parent / f"{data_dir.name}-collector.log"
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [
                *(command or [sys.executable, "-m", "modtrack.collector"]), "serve",
                "--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", "127.0.0.1:0",
                "--data-dir", str(data_dir), *extra,
            ],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env(), cwd=REPO,
        )  # fmt: skip
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
            raise AssertionError(f"collector not ready after {timeout} s: {self.lines} {self.log()}")
        self.grpc_target, self.http_addr = READY.search("".join(self.lines)).groups()
        self.url = f"http://{self.http_addr}"

    def __enter__(self) -> CollectorProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()

    def get(self, path: str):
        """The JSON answer of GET path on the HTTP API (HTTP errors raise)."""
        return get_json(self.url + path, timeout=10)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def kill(self) -> None:
        """kill -9: no flush, no goodbye."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def terminate(self) -> int:
        """SIGTERM (kill -9 if it does not end within 30 s); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
