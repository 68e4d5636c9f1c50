"""gRPC ingest: the servicer for modtrack.v1.Collector/Stream, one bidirectional stream per rank.

Each stream opens with a Hello; reports come one per message (`report`, older agents) or several
(`reports`, a StepReportBatch). Every report of a message is validated at the edge before any of it
is stored (a bad one aborts only its own stream with INVALID_ARGUMENT and names its step in the
trailing metadata), remapped to job-wide module ids, stored in one write through the single writer
and queued for the merge. Acks are cumulative and sent only after the SQLite
commit that holds the report. Control messages (trace capture, pause, resume) go out through
the stream's own queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np

from modtrack.collector import auth
from modtrack.collector.config import ServeConfig
from modtrack.collector.ingest import edge_limits
from modtrack.collector.ingest.edge_limits import Refused, invalid
from modtrack.collector.ingest.parse import RankStream, parse_report
from modtrack.collector.pipeline.collectives import CollectiveBook
from modtrack.collector.pipeline.gpu_health import GpuBoard
from modtrack.collector.pipeline.merge import Merger
from modtrack.collector.pipeline.stall_watch import BadHeartbeat, StallWatch  # hung jobs (issue 14)
from modtrack.collector.store.sqlite import Store
from modtrack.collector.store.writer import StoreWriter
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc

log = logging.getLogger("modtrack.collector.ingest")

# Trailing metadata of a stream refused for one report: that report's step, so the agent drops it
# (and only it) from what it replays.
REFUSED_STEP_KEY = "modtrack-refused-step"


@dataclass
class _End:
    code: grpc.StatusCode | None = None
    message: str = ""
    step: int | None = None  # the refused report's step


class IngestServicer(pb_grpc.CollectorServicer):
    def __init__(self, merger: Merger, store: Store, writer: StoreWriter, token=None, metrics=None, restore_job=None):
        self.merger = merger
        self.restore_job = restore_job  # async (job): reads a job not in memory back from SQLite
        self.store = store
        self.writer = writer
        self.token = token
        self.metrics = metrics
        self.streams: dict[str, set] = {}  # job -> live RankStreams
        self.rejected = 0
        self.hello_timeout_s = ServeConfig.hello_timeout_s
        self.refusals = auth.RefusalLog()
        self.stall_watch = StallWatch()  # hung jobs: the latest heartbeat of every rank
        self.sample_every: dict[str, int] = {}  # sampled mode set over the API, per job: told to every rank
        self.collectives = CollectiveBook()  # collective timing per rank and group (issue 15)
        self.gpu_health = GpuBoard()  # GPU health: the latest GPU sample of every rank

    def connected(self, job: str) -> bool:
        """Some rank of `job` has a stream open."""
        return bool(self.streams.get(job))

    def forget_job(self, job: str) -> None:
        """The job left memory (finished long ago); a new stream of it starts a new entry."""
        if not self.streams.get(job):
            self.streams.pop(job, None)
            self.collectives.forget(job)
            self.sample_every.pop(job, None)  # a job of that name coming back samples as its agents say

    # --- control, called from the HTTP API on the same loop -------------------------------
    def request_capture(self, job: str, steps: int) -> tuple[str, int]:
        """Ask every connected rank of `job` to trace its next `steps` steps. Returns
        (capture_id, ranks asked); KeyError for a job with no connected rank."""
        capture_id = uuid.uuid4().hex[:16]
        asked = self._control(job, pb.Control(capture=pb.CaptureTrace(capture_id=capture_id, steps=steps)))
        self.writer.call(self.store.add_capture, capture_id, job, steps, asked)
        return capture_id, asked

    def set_sampling(self, job: str, every: int) -> int:
        """Sampled mode: module detail on every `every`-th step of `job` (1: every step), for every rank
        connected now and any that (re)connects later. Returns the ranks told; KeyError: none connected."""
        asked = self._control(job, pb.Control(sampling=pb.SetSampling(every_n_steps=every)))
        self.sample_every[job] = every
        return asked

    def sampling(self, job: str) -> int | None:
        """The sampling set over the API for `job`; None: never set (the agents' own MODTRACK_SAMPLE_EVERY)."""
        return self.sample_every.get(job)

    def pause(self, job: str) -> int:
        return self._control(job, pb.Control(pause=pb.Pause()))

    def resume(self, job: str) -> int:
        return self._control(job, pb.Control(resume=pb.Resume()))

    def _control(self, job: str, control) -> int:
        streams = self.streams.get(job)
        if not streams:
            raise KeyError(job)
        for s in streams:
            s.out.put_nowait(pb.CollectorMessage(control=control))
        return len(streams)

    # --- the RPC ---------------------------------------------------------------------------
    async def Stream(self, request_iterator, context):
        access = auth.access(auth.grpc_header(context.invocation_metadata()), self.token)
        if access is None:
            self._rejected("unauthenticated")
            self.refusals.refused(context.peer(), "missing or wrong bearer token")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        out: asyncio.Queue = asyncio.Queue()
        holder: list[RankStream] = []
        reader = asyncio.create_task(self._read(request_iterator, out, holder, access))
        try:
            while True:
                item = await out.get()
                if isinstance(item, _End):
                    if item.code is not None:
                        self._rejected(item.code.name.lower())
                        if item.code == grpc.StatusCode.PERMISSION_DENIED:
                            self.refusals.refused(context.peer(), item.message)
                        else:
                            log.warning("stream aborted: %s", item.message)
                        trailing = () if item.step is None else ((REFUSED_STEP_KEY, str(item.step)),)
                        await context.abort(item.code, item.message, trailing_metadata=trailing)
                    return
                yield item
        finally:
            reader.cancel()
            if holder:
                self.streams.get(holder[0].job, set()).discard(holder[0])
                self.stall_watch.gone(holder[0].job, holder[0].rank, holder[0])  # hung jobs

    async def _read(self, request_iterator, out: asyncio.Queue, holder: list, access=None) -> None:
        acks: asyncio.Queue = asyncio.Queue()
        acker = asyncio.create_task(self._ack(acks, out))
        stream = None
        newest_step = -1
        try:
            async for msg in edge_limits.checked_messages(request_iterator, self.hello_timeout_s):
                received_ns = time.time_ns()
                kind = msg.WhichOneof("body")
                if kind == "hello":
                    if stream is not None:
                        raise invalid("a second Hello on the same stream")
                    edge_limits.check_hello(msg.hello, access)
                    if self.restore_job is not None and msg.hello.job not in self.merger.jobs:
                        await self.restore_job(msg.hello.job)
                    stream = self._hello(msg.hello, out)
                    holder.append(stream)
                elif stream is None:
                    raise invalid(f"the first message must be a Hello, got {kind}")
                elif kind == "reports":
                    edge_limits.check_batch(msg.reports.reports)
                    newest_step = self._reports(msg.reports.reports, stream, acks, newest_step)
                elif kind == "report":
                    newest_step = self._reports((msg.report,), stream, acks, newest_step)
                elif kind == "ping":
                    out.put_nowait(
                        pb.CollectorMessage(
                            pong=pb.ClockPong(t1_ns=msg.ping.t1_ns, t2_ns=received_ns, t3_ns=time.time_ns())
                        )
                    )
                elif kind == "clock":
                    self._clock(msg.clock, stream)
                elif kind == "heartbeat":  # hung jobs: where a rank in a long step is
                    try:
                        self.stall_watch.heartbeat(stream.job, stream.rank, msg.heartbeat, stream)
                        self.merger.jobs[stream.job].ranks[stream.rank].last_seen = time.monotonic()  # not missing
                    except BadHeartbeat as exc:
                        raise invalid(f"job {stream.job!r} rank {stream.rank}: {exc}") from None
                else:
                    raise invalid("an empty AgentMessage")
            acks.put_nowait(None)
            self.writer.hurry()  # the stream ends: its last reports' commit need not wait out the batch window
            await acker  # the last reports' acks go out before the stream ends
            out.put_nowait(_End())
        except Refused as exc:
            out.put_nowait(_End(exc.code, str(exc), exc.step))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store failed, or a bug: end this stream, serve the rest
            log.exception("stream failed")
            out.put_nowait(_End(grpc.StatusCode.UNAVAILABLE, f"collector error: {exc}"))
        finally:
            acker.cancel()

    def _hello(self, h, out: asyncio.Queue) -> RankStream:
        announced = h.attempt if h.HasField("attempt") else None
        job = self.merger.hello(
            h.job, h.rank, h.world_size, h.host, h.clock_kind, h.session, announced, h.wall_durations
        )
        attempt = job.sessions[h.rank][0]
        names = list(h.module_names)
        remap = self._extend(job.job)(names)
        stream = RankStream(h.job, h.rank, names, remap, out, attempt)
        self.streams.setdefault(h.job, set()).add(stream)
        every = self.sample_every.get(h.job)
        if every is not None:  # a rank that (re)connects follows the job's sampled mode too
            out.put_nowait(pb.CollectorMessage(control=pb.Control(sampling=pb.SetSampling(every_n_steps=every))))
        self.writer.call(self.store.upsert_job, h.job, h.world_size, job.attempt)
        self.writer.call(
            self.store.upsert_rank,
            h.job,
            h.rank,
            {
                "local_rank": h.local_rank,
                "group_rank": h.group_rank,
                "host": h.host,
                "pid": h.pid,
                "session": h.session,
                "torch_version": h.torch_version,
                "agent_version": h.agent_version,
                "clock_kind": h.clock_kind,
                "last_seen_ns": time.time_ns(),
                "state": "live",
                "attempt": attempt,
                "wall_durations": int(h.wall_durations),
            },
        )
        log.info(
            "rank %d of job %r (attempt %d) connected from %s (pid %d, %d modules)",
            h.rank,
            h.job,
            attempt,
            h.host,
            h.pid,
            len(names),
        )
        return stream

    def _extend(self, job: str):
        """A function giving job-wide ids for names, persisting names the job had not seen."""

        def extend(names: list[str]) -> np.ndarray:
            edge_limits.check_table_growth(self.merger.jobs[job], names)
            ids, first_new, added = self.merger.jobs[job].module_ids(names)
            if added:
                self.writer.call(self.store.add_modules, job, first_new, list(added))
            return ids

        return extend

    def _reports(self, reports, stream: RankStream, acks: asyncio.Queue, newest_step: int) -> int:
        """Check and parse every report of one message, then store them in one write and queue them
        for the merge; returns the rank's newest step. A bad report refuses the whole message (its
        step goes back to the agent): nothing of it is stored, everything stored before stays."""
        job = self.merger.jobs[stream.job]
        info = job.ranks[stream.rank]
        offset = job.host_offset(stream.rank)  # collectives are lined up on the host's best clock offset
        extend = self._extend(stream.job)
        rows = []
        for report in reports:
            try:
                newest_step = edge_limits.check_report(report, newest_step, job.last_evaluated)
                rows.append(parse_report(report, stream, extend))
                rows[-1].clock_offset_ns = offset  # stored: a replay lines the ranks up as here
            except Refused as exc:
                exc.step = report.step
                raise
        acks.put_nowait((max(row.step for row in rows), self.writer.steps(rows)))
        late = [row for row in rows if not self.merger.add(row)]  # stored, but too late (or of an older attempt)
        if late:
            if self.metrics is not None:
                self.metrics.count_duplicate(stream.job, "late", len(late))
            if not stream.duplicates_logged:
                stream.duplicates_logged = True
                log.warning(
                    "rank %d of job %r (attempt %d): step %d came after the job's step %d was "
                    "evaluated; stored, not merged (logged once per stream)",
                    stream.rank,
                    stream.job,
                    stream.attempt,
                    late[0].step,
                    job.last_evaluated,
                )
        info.counters = rows[-1].counters
        for row in rows:
            if info.waits_in_modules and row.detail and (row.collectives or self.collectives.knows(stream.job)):
                # where its waits happened: taken out of its module compute before ranks are compared
                self.collectives.add_windows(stream.job, stream.attempt, stream.rank, offset, row.step, row.modules)
            if row.collectives:
                self.collectives.add(stream.job, stream.attempt, stream.rank, offset, row.collectives)
            if row.gpu is not None:  # GPU health: the rank's latest sample
                self.gpu_health.observe(stream.job, stream.rank, info.host, row.gpu)
        self._observe_rank(stream, info)
        return newest_step

    def _clock(self, clock, stream: RankStream) -> None:
        edge_limits.check_offset(clock.offset_ns)
        job = self.merger.jobs[stream.job]
        info = job.ranks[stream.rank]
        info.clock_offset_ns = clock.offset_ns
        job.note_clock(stream.rank, clock.offset_ns, clock.rtt_ns)
        self.writer.call(
            self.store.upsert_rank,
            stream.job,
            stream.rank,
            {"clock_offset_ns": clock.offset_ns, "rtt_ns": clock.rtt_ns},
        )
        self._observe_rank(stream, info)

    def _rejected(self, reason: str) -> None:
        self.rejected += 1
        if self.metrics is not None:
            self.metrics.count_rejected(reason)

    def _observe_rank(self, stream: RankStream, info) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.observe_rank(
                stream.job, stream.rank, info.host, info.clock_offset_ns / 1e6, dict(info.counters)
            )
        except Exception:
            log.exception("metrics.observe_rank failed")

    async def _ack(self, acks: asyncio.Queue, out: asyncio.Queue) -> None:
        """Cumulative acks: after each commit, one Ack for the highest step stored so far."""
        best = None
        waiting: collections.deque = collections.deque()
        try:
            while True:
                if not waiting:
                    waiting.append(await acks.get())
                while not acks.empty():
                    waiting.append(acks.get_nowait())
                item = waiting.popleft()
                if item is None:
                    return
                step, committed = item
                await committed
                best = step if best is None else max(best, step)
                if not waiting or waiting[0] is None or not waiting[0][1].done():
                    out.put_nowait(pb.CollectorMessage(ack=pb.Ack(step=best)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the commit failed: no ack; the agent replays on reconnect
            log.error("store commit failed: %s", exc)
            out.put_nowait(_End(grpc.StatusCode.UNAVAILABLE, f"collector store error: {exc}"))
