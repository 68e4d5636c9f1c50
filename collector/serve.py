"""`collector serve`: gRPC ingest and the HTTP API on one asyncio loop, SQLite underneath.

Threads: the loop (ingest, HTTP, the merge tick), one store writer, a small read pool for
HTTP queries, and one evaluation thread (matrix building, detector, metrics) so that a large
job's detection never stalls ingest.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import ssl
import time
from dataclasses import dataclass, field

import grpc
from aiohttp import web

from modtrack.collector import auth, edge_limits, http_api
from modtrack.collector.alert_payload import episode_to_alert
from modtrack.collector.alerting import AlertDispatcher
from modtrack.collector.detector import Detector, DetectorParams, params_for_clock
from modtrack.collector.ingest import IngestServicer
from modtrack.collector.merge import JobState, Merger, ReadyStep, RankState, build_matrix
from modtrack.collector.metrics import CollectorMetrics
from modtrack.collector.store import Store, StoreWriter
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc

log = logging.getLogger("modtrack.collector")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one report of ~500k module entries; bigger is refused


@dataclass
class ServeConfig:
    grpc_addr: str = "127.0.0.1:50051"
    http_addr: str = "127.0.0.1:8080"
    data_dir: str = "./modtrack-data"
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    watermark_s: float = 2.0
    missing_after_s: float = 30.0
    retain_steps: int = 5000
    alert_webhooks: list[str] = field(default_factory=list)
    dashboard_url: str | None = None
    tick_s: float = 0.05
    max_streams: int = 16384  # concurrent gRPC streams; more get RESOURCE_EXHAUSTED
    hello_timeout_s: float = edge_limits.HELLO_TIMEOUT_S
    retention_every_s: float = 10.0
    detector: DetectorParams = field(default_factory=DetectorParams)  # for every job


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Collector:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.token = auth.as_tokens(config.token)
        self.store = Store(config.data_dir)
        self.merger = Merger(config.watermark_s, config.missing_after_s)
        self.detectors: dict[str, object] = {}
        self.episode_ids: dict[tuple, int] = {}
        self.eval_errors = 0
        self.grpc_port = self.http_port = None
        self._stopping = None

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.writer = StoreWriter(self.store, loop)
        self.read_pool = concurrent.futures.ThreadPoolExecutor(2, "modtrack-read")
        self.eval_pool = concurrent.futures.ThreadPoolExecutor(1, "modtrack-eval")
        self._stopping = asyncio.Event()
        self.metrics = CollectorMetrics()
        # Logs every episode change, and posts to the webhooks when there are any.
        self.alerting = AlertDispatcher(self.config.alert_webhooks, self.config.dashboard_url or "",
                                        metrics=self.metrics)
        await self.alerting.start()
        await self.read(self._restore)
        self.ingest = IngestServicer(self.merger, self.store, self.writer, self.token, self.metrics)
        self.ingest.hello_timeout_s = self.config.hello_timeout_s
        self.grpc_server = grpc.aio.server(maximum_concurrent_rpcs=self.config.max_streams, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000)])
        pb_grpc.add_CollectorServicer_to_server(self.ingest, self.grpc_server)
        if self.config.tls_cert:
            with open(self.config.tls_key, "rb") as k, open(self.config.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.grpc_port = self.grpc_server.add_secure_port(self.config.grpc_addr, creds)
        else:
            self.grpc_port = self.grpc_server.add_insecure_port(self.config.grpc_addr)
        await self.grpc_server.start()
        self.runner = web.AppRunner(http_api.make_app(self), access_log=None)
        await self.runner.setup()
        host, port = _split(self.config.http_addr)
        site = web.TCPSite(self.runner, host, port, ssl_context=self._ssl_context())
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]
        self._tick_task = asyncio.create_task(self._tick())
        # hung jobs (issue 14): stall verdicts, ModtrackJobStalled alerts, modtrack_job_stalled_seconds
        self.metrics.registry.register(self.ingest.stall_watch)
        self._stall_task = asyncio.create_task(self.ingest.stall_watch.run(self.merger.jobs, self.alerting))

    def ready_line(self) -> str:
        grpc_host, _ = _split(self.config.grpc_addr)
        http_host, _ = _split(self.config.http_addr)
        return (f"modtrack collector ready grpc={grpc_host}:{self.grpc_port} "
                f"http={http_host}:{self.http_port} data={self.store.path}")

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
        self.eval_pool.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(None, self.writer.close)
        self.read_pool.shutdown(wait=True)

    # --- helpers for the API -------------------------------------------------------------------
    async def read(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.read_pool, fn, *args)

    def exposition(self) -> tuple[bytes, str]:
        return self.metrics.exposition()

    def alerts(self, active_episodes) -> list[dict]:
        """Alerts for the active episodes; the dispatcher's copies know when each started."""
        live = {a["fingerprint"]: a for a in self.alerting.active_alerts()}
        alerts = [episode_to_alert(e, self.config.dashboard_url or "") for e in active_episodes]
        return [live.get(a["fingerprint"], a) for a in alerts] + self.ingest.stall_watch.alerts()  # + hung jobs

    # --- restart: the same history ----------------------------------------------------------
    def _restore(self) -> None:
        """Reload job module tables, evaluated steps and active episodes (read thread)."""
        for row in self.store.jobs():
            job = row["job"]
            last = row["last_evaluated_step"]
            state = JobState(job, row["world_size"], self.store.module_names(job),
                             -1 if last is None else last)
            for r in self.store.ranks(job):  # not waited for until they report again
                state.ranks[r["rank"]] = RankState(host=r["host"] or "", last_seen=0.0,
                                                   state="missing",
                                                   clock_offset_ns=r["clock_offset_ns"] or 0,
                                                   clock_kind=r["clock_kind"] or 0)
            self.merger.jobs[job] = state
            episodes = self.store.episodes(job, "active")
            for ep in self.store.episodes(job):
                self.episode_ids[_episode_key(ep)] = ep.id
            if episodes:
                self._detector(job).restore(episodes)
        self._next_episode_id = self.store.max_episode_id() + 1

    # --- the merge tick and evaluation -----------------------------------------------------------
    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        next_retention = time.monotonic() + self.config.retention_every_s
        while True:
            await asyncio.sleep(self.config.tick_s)
            try:
                ready, missing = self.merger.due(time.monotonic())
                for job, rank in missing:
                    log.warning("rank %d of job %r is missing (no report for %.0f s)", rank, job,
                                self.config.missing_after_s)
                    self.writer.call(self.store.upsert_rank, job, rank, {"state": "missing"})
                    self.metrics.mark_rank_missing(job, rank, self.merger.jobs[job].ranks[rank].host)
                if ready:
                    await loop.run_in_executor(self.eval_pool, self._evaluate, ready)
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + self.config.retention_every_s
                    for job in list(self.merger.jobs):
                        self.writer.call(self.store.drop_old_module_blobs, job,
                                         self.config.retain_steps)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.eval_errors += 1
                log.exception("merge tick failed")

    def _detector(self, job: str) -> Detector:
        if job not in self.detectors:
            state = self.merger.jobs.get(job)
            cpu = state is not None and any(r.clock_kind == pb.CLOCK_KIND_CPU for r in state.ranks.values())
            self.detectors[job] = Detector(job, params_for_clock(self.config.detector, cpu))
        return self.detectors[job]

    def _evaluate(self, ready: list[ReadyStep]) -> None:
        """Evaluation thread: matrix, detector, episodes to the store, metrics, alerts."""
        for item in ready:
            job = item.job.job
            try:
                matrix = build_matrix(item.job, item.step, item.rows)
                detector = self._detector(job)
                changed = detector.observe(matrix)
                for ep in changed:
                    self._persist_episode(ep)
                self.writer.call_threadsafe(self.store.set_evaluated, job, item.step)
                self.metrics.observe_step(matrix, item.lag_s)
                if changed:
                    self.metrics.set_episodes(job, detector.active())
            except Exception:
                self.eval_errors += 1
                log.exception("evaluating step %d of job %r failed", item.step, job)

    def _persist_episode(self, ep) -> None:
        key = _episode_key(ep)
        if ep.id is None:
            ep.id = self.episode_ids.get(key)
        if ep.id is None:
            ep.id = self._next_episode_id
            self._next_episode_id += 1
        self.episode_ids[key] = ep.id
        snapshot = dataclasses.replace(ep, ranks=list(ep.ranks))
        self.writer.call_threadsafe(self.store.upsert_episode, snapshot)
        log.info("straggler episode %s: job %r rank %d host %s %s/%s %.2fx steps %d-%d",
                 ep.state, ep.job, ep.rank, ep.host, ep.module, ep.phase, ep.slowdown,
                 ep.first_step, ep.last_step)
        self.alerting.episode_changed(snapshot)  # thread-safe, never blocks


def _episode_key(ep) -> tuple:
    return (ep.job, ep.rank, ep.module, ep.phase, ep.first_step)


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
