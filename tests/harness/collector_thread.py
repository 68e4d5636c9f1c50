"""A real collector in this process: its own event loop on a thread, ports picked by the kernel.

Fast to start, and its objects (store, merger) are at hand for the test; use harness.collector_process
for the command users run."""

from __future__ import annotations

import asyncio
import threading

from modtrack.collector.pipeline.detector import DetectorParams
from modtrack.collector.serve import Collector, ServeConfig


class CollectorThread:
    """A real Collector on loopback, port 0, running on its own event loop thread."""

    def __init__(self, data_dir, **config):
        config.setdefault("watermark_s", 0.5)
        # fake ranks are slow (or not) from their first step: no warm-up to skip, unless a test asks
        config.setdefault("detector", DetectorParams(warmup_steps=0))
        self.config = ServeConfig(grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0", data_dir=str(data_dir), **config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.collector = Collector(self.config)
        asyncio.run_coroutine_threadsafe(self.collector.start(), self.loop).result(30)
        self.grpc_target = f"127.0.0.1:{self.collector.grpc_port}"
        self.url = f"http://127.0.0.1:{self.collector.http_port}"

    def flush_store(self, timeout: float = 10.0) -> None:
        """Until everything handed to the store's writer before now is committed (one FIFO writer thread:
        a no-op queued now commits after all of it)."""

        async def barrier():
            done = self.collector.writer.call(lambda: None)
            self.collector.writer.hurry()  # a barrier, not a report: no need to sleep out the batch window
            await done

        asyncio.run_coroutine_threadsafe(barrier(), self.loop).result(timeout)

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.collector.stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
