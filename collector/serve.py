"""`collector serve`: the stages wired together on one asyncio loop, SQLite underneath.

ingest (gRPC) -> pipeline (merge, evaluate: detect, episodes) -> store; api (HTTP) reads the
store; outputs (metrics, alerts) are fed by ingest and the pipeline. This module only builds
the stages, hands each what it needs, and starts and stops them.

Threads: the loop (ingest, HTTP, the merge tick), one store writer, a small read pool for
HTTP queries and scrapes, and one evaluation thread (matrix building, detector, metrics) so that
a large job's detection never stalls ingest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl

import grpc
from aiohttp import web

from modtrack.collector import auth
from modtrack.collector.api.routes import ApiDeps, make_app
from modtrack.collector.config import ServeConfig
from modtrack.collector.ingest.servicer import IngestServicer
from modtrack.collector.outputs.alert_payload import episode_to_alert
from modtrack.collector.outputs.alerting import AlertDispatcher
from modtrack.collector.outputs.gpu_metrics import GpuMetrics
from modtrack.collector.outputs.metrics import CollectorMetrics, FailureCounts
from modtrack.collector.pipeline.evaluator import Evaluator
from modtrack.collector.pipeline.merge import Merger
from modtrack.collector.store.sqlite import Store
from modtrack.collector.store.writer import StoreWriter
from modtrack.protos import modtrack_pb2_grpc as pb_grpc

__all__ = ["Collector", "ServeConfig", "serve"]

log = logging.getLogger("modtrack.collector")


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Collector:
    def __init__(self, config: ServeConfig):
        self.config = config.validate()
        self.token = auth.as_tokens(config.token)
        self.store = Store(config.data_dir)
        self.merger = Merger(config.watermark_s, config.missing_after_s)
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._stopping = asyncio.Event()

    @property
    def eval_errors(self) -> int:
        return self.evaluator.eval_errors

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.writer = StoreWriter(self.store, loop)
        self.read_pool = concurrent.futures.ThreadPoolExecutor(2, "modtrack-read")
        self.metrics = CollectorMetrics()
        # Logs every episode change, and posts to the webhooks when there are any.
        self.alerting = AlertDispatcher(
            self.config.alert_webhooks, self.config.dashboard_url or "", metrics=self.metrics
        )
        await self.alerting.start()
        self.evaluator = Evaluator(
            self.config, self.merger, self.store, self.writer, self.metrics, self.alerting, self.read
        )
        await self.read(self.evaluator.restore_all)
        self.ingest = IngestServicer(
            self.merger, self.store, self.writer, self.token, self.metrics, restore_job=self._restore_job
        )
        await self.read(self._restore_collectives, list(self.merger.jobs.values()))
        self.ingest.hello_timeout_s = self.config.hello_timeout_s
        self.evaluator.connected = self.ingest.connected
        self.evaluator.on_forget += [self.ingest.forget_job, self.metrics.forget_job, self._forget_in_store]
        self.evaluator.on_forget.append(self.alerting.forget_job)  # its alerts stop firing
        # GPU health: verdicts explained by the culprit's GPU, and its gauges on /metrics
        # ... and by the collectives: the group where it arrives last (collective timing, opt-in on the agent)
        self.evaluator.collective_waits = self.ingest.collectives.recent_waits  # waits inside module windows
        self.evaluator.collective_module_waits = self.ingest.collectives.module_waits  # ... and where
        self.evaluator.collectives_in = self.ingest.collectives.step_in
        self.evaluator.explain = lambda ep: "; ".join(
            text for text in (self.ingest.gpu_health.explain(ep), self.ingest.collectives.explain(ep)) if text
        )
        self.evaluator.on_forget.append(self.ingest.gpu_health.forget)
        self.metrics.registry.register(GpuMetrics(self.ingest.gpu_health))
        self.metrics.failures = self.failure_counts
        self.grpc_server = grpc.aio.server(
            maximum_concurrent_rpcs=self.config.max_streams,
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ],
        )
        pb_grpc.add_CollectorServicer_to_server(self.ingest, self.grpc_server)
        if self.config.tls_cert:
            assert self.config.tls_key is not None  # validate(): both or neither
            with open(self.config.tls_key, "rb") as k, open(self.config.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.grpc_port = self.grpc_server.add_secure_port(self.config.grpc_addr, creds)
        else:
            self.grpc_port = self.grpc_server.add_insecure_port(self.config.grpc_addr)
        await self.grpc_server.start()
        self.runner = web.AppRunner(make_app(self.api_deps()), access_log=None)
        await self.runner.setup()
        host, port = _split(self.config.http_addr)
        site = web.TCPSite(self.runner, host, port, ssl_context=self._ssl_context())
        await site.start()
        self.http_port = self.runner.addresses[0][1]
        self._tick_task = asyncio.create_task(self.evaluator.run())
        # hung jobs (issue 14): stall verdicts, ModtrackJobStalled alerts, modtrack_job_stalled_seconds
        self.metrics.registry.register(self.ingest.stall_watch)
        self.metrics.registry.register(self.ingest.collectives)  # collective timing (issue 15)
        self._stall_task = asyncio.create_task(self.ingest.stall_watch.run(self.merger.jobs, self.alerting))

    async def _restore_job(self, job: str) -> None:
        """A job not in memory says Hello: its merge state and verdicts, then its recent collective stats."""
        await self.evaluator.restore_job(job)
        state = self.merger.jobs.get(job)
        if state is not None and not self.ingest.collectives.knows(job):
            await self.read(self._restore_collectives, [state])

    def _restore_collectives(self, jobs: list) -> None:
        """Read thread: each job's stored collective stats of its newest steps (its latest attempt), so who
        arrives last and what its peers wait survive a restart of the collector."""
        book = self.ingest.collectives
        for state in jobs:
            stored = self.store.collective_stats(state.job, state.attempt, book.keep_steps)
            book.restore(state.job, state.attempt, stored)

    def api_deps(self) -> ApiDeps:
        def ranks_reporting(job: str) -> int | None:
            state = self.merger.jobs.get(job)
            return None if state is None else state.live_ranks()

        return ApiDeps(
            store=self.store,
            read=self.read,
            tokens=self.token,
            ranks_reporting=ranks_reporting,
            controls=self.ingest,
            alerts=self.alerts,
            exposition=self.metrics.exposition,
            store_errors=lambda: self.writer.errors,
            stall=lambda job: self.ingest.stall_watch.verdict(job, self.merger.jobs.get(job)),  # hung jobs
            gpu=self.ingest.gpu_health.ranks,  # GPU health
            collectives=self.ingest.collectives.summary,  # collective timing
        )

    def _forget_in_store(self, job: str) -> None:
        self.writer.call(self.store.forget_job, job)

    def failure_counts(self) -> FailureCounts:
        """Every failure counter of the stages, read at scrape time."""
        return FailureCounts(
            eval_errors=self.evaluator.eval_errors,
            late_reports=self.merger.late_reports,
            ingest_rejected=self.ingest.rejected,
            alert_changes_dropped=self.alerting.dropped_changes,
            store_write_errors=self.writer.errors,
            jobs_forgotten=self.evaluator.jobs_forgotten,
        )

    def ready_line(self) -> str:
        grpc_host, _ = _split(self.config.grpc_addr)
        http_host, _ = _split(self.config.http_addr)
        return (
            f"modtrack collector ready grpc={grpc_host}:{self.grpc_port} "
            f"http={http_host}:{self.http_port} data={self.store.path}"
        )

    def _ssl_context(self):
        if not self.config.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return ctx

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        """Stop taking streams, evaluate what can be, commit everything, close."""
        self._tick_task.cancel()
        self._stall_task.cancel()  # hung jobs
        await self.grpc_server.stop(grace=1.0)
        await self.runner.cleanup()
        await self.alerting.stop()
        self.evaluator.close()
        await asyncio.get_running_loop().run_in_executor(None, self.writer.close)
        self.read_pool.shutdown(wait=True)

    # --- helpers for the API -------------------------------------------------------------------
    async def read(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.read_pool, fn, *args)

    def alerts(self, active_episodes) -> list[dict]:
        """Alerts for the active episodes; the dispatcher's copies know when each started."""
        live = {a["fingerprint"]: a for a in self.alerting.active_alerts()}
        alerts = [episode_to_alert(e, self.config.dashboard_url or "") for e in active_episodes]
        return [live.get(a["fingerprint"], a) for a in alerts] + self.ingest.stall_watch.alerts()  # + hung jobs


async def serve(config: ServeConfig, on_ready=print) -> None:
    """Run until SIGTERM/SIGINT (or request_stop), then flush and return."""
    import signal

    collector = Collector(config)
    await collector.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, collector.request_stop)
    on_ready(collector.ready_line())
    await collector.wait_stopped()
    log.info("stopping: flushing the store")
    await collector.stop()
