"""A webhook receiver for tests: records every JSON POST it gets, can answer slowly or with errors."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookReceiver:
    """Listens on 127.0.0.1 (free port) in a thread; use as a context manager."""

    def __init__(self, delay_s: float = 0.0, fail_first: int = 0, status: int = 200):
        self.delay_s = delay_s
        self.fail_first = fail_first  # answer 503 to this many requests first
        self.status = status
        self.received: list[tuple[float, dict]] = []  # (arrival time.monotonic(), body)
        self.requests = 0
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(receiver.delay_s)
                with receiver._cond:
                    receiver.requests += 1
                    failing = receiver.requests <= receiver.fail_first
                    if not failing and receiver.status < 300:
                        receiver.received.append((time.monotonic(), json.loads(body)))
                        receiver._cond.notify_all()
                self.send_response(503 if failing else receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self):
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def wait_for(self, predicate, timeout_s: float) -> list[dict]:
        """The bodies received once predicate(list of bodies) is true; AssertionError at the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(bodies := [b for _, b in self.received]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"waited {timeout_s:g} s for the webhook bodies; got {bodies}")
                self._cond.wait(left)
            return bodies
