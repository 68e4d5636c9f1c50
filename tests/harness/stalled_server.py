"""A hung collector host: accepts TCP connections and never reads a byte."""

from __future__ import annotations

import socket
import threading


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
