"""gRPC ingest: the servicer for modtrack.v1.Collector/Stream, one bidirectional stream per rank.

Each stream opens with a Hello; reports are validated at the edge (a bad one aborts only its
own stream with INVALID_ARGUMENT), remapped to job-wide module ids, stored through the
single writer and queued for the merge. Acks are cumulative and sent only after the SQLite
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

from modtrack.collector import auth, edge_limits
from modtrack.collector.merge import Merger
from modtrack.collector.stall_watch import BadHeartbeat, StallWatch  # hung jobs (issue 14)
from modtrack.collector.store import PHASE_NAMES, STEP_FIGURES, Store, StepRow, StoreWriter
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc

log = logging.getLogger("modtrack.collector.ingest")

PHASE_COLUMNS = ("module_id", "calls", "inclusive_ns", "self_ns", "first_start_ns", "last_end_ns")
TRACE_FIELDS = ("module_id", "phase", "start_ns", "end_ns", "depth")
COUNTERS = ("reports_dropped", "reconnects", "hook_errors", "send_errors")


class InvalidInput(ValueError):
    """A message the collector refuses: its stream ends with INVALID_ARGUMENT and this text."""


@dataclass
class _End:
    code: grpc.StatusCode | None = None
    message: str = ""


@dataclass(eq=False)
class RankStream:
    """One connected rank: its module-name table and the remap to job-wide ids."""

    job: str
    rank: int
    names: list
    remap: np.ndarray  # rank-local module id -> job-wide module id
    out: asyncio.Queue


def _array(values, dtype) -> np.ndarray:
    return np.array(values, dtype=dtype) if len(values) else np.zeros(0, dtype)


# Rows of the one int64 block a report's phases are copied into (see _phase_block).
_ID, _INCLUSIVE, _SELF, _FIRST_START, _LAST_END = range(5)


def parse_report(report, stream: RankStream, extend_table) -> StepRow:
    """Validate one StepReport and turn it into a StepRow with job-wide module ids.

    `extend_table(names)` returns job-wide ids for module names first seen in this report.
    All phases are copied into one block and checked in a handful of numpy passes; only a
    report that fails them is walked phase by phase, to say exactly what is wrong."""
    where = f"job {stream.job!r} rank {stream.rank} step {report.step}"
    _add_new_names(report, stream, extend_table, where)
    figures = {name: getattr(report, name) for name in STEP_FIGURES}
    negative = [name for name in STEP_FIGURES[2:] if figures[name] < 0]
    if negative:
        raise InvalidInput(f"{where}: negative duration {negative[0]}={figures[negative[0]]}")
    if figures["end_ns"] < figures["start_ns"]:
        raise InvalidInput(f"{where}: end_ns {figures['end_ns']} is before start_ns {figures['start_ns']}")
    block, calls, phase = _phase_block(report.phases)
    if block is None or not _block_ok(block, len(stream.remap)):
        _explain_phases(report, stream, where)  # raises InvalidInput
    modules = {"phase": phase, "module": stream.remap[block[_ID]], "calls": calls,
               "inclusive": block[_INCLUSIVE], "self": block[_SELF],
               "first_start": block[_FIRST_START], "last_end": block[_LAST_END]}
    counters = {name: getattr(report.counters, name) for name in COUNTERS}
    return StepRow(stream.job, stream.rank, report.step, figures, modules,
                   _parse_trace(report, stream, where), counters)


def _phase_block(phases):
    """(int64 block of 5 rows x all entries, calls, phase per entry), or (None, None, None)
    when a phase is unknown or its columns differ in length. np.array on a repeated field
    is a C copy; building one block keeps it to one copy per field and no concatenation."""
    lengths = []
    for ph in phases:
        n = len(ph.module_id)
        if ph.phase not in PHASE_NAMES or any(len(getattr(ph, c)) != n for c in PHASE_COLUMNS[1:]):
            return None, None, None
        lengths.append(n)
    total = sum(lengths)
    block = np.empty((5, total), np.int64)
    calls = np.empty(total, np.uint32)
    at = 0
    for ph, n in zip(phases, lengths):
        if n:
            end = at + n
            block[_ID, at:end] = ph.module_id
            block[_INCLUSIVE, at:end] = ph.inclusive_ns
            block[_SELF, at:end] = ph.self_ns
            block[_FIRST_START, at:end] = ph.first_start_ns
            block[_LAST_END, at:end] = ph.last_end_ns
            calls[at:end] = ph.calls
            at = end
    phase = np.repeat(np.array([ph.phase for ph in phases], np.uint8), lengths)
    return block, calls, phase


def _block_ok(block: np.ndarray, table_size: int) -> bool:
    """Every id in the rank's table, durations in [0, a day], stamps in range: five passes."""
    if not block.shape[1]:
        return True
    durations, stamps = block[_INCLUSIVE:_SELF + 1], block[_FIRST_START:_LAST_END + 1]
    return bool(block[_ID].max() < table_size
                and durations.min() >= 0 and durations.max() <= edge_limits.MAX_DURATION_NS
                and stamps.min() >= -edge_limits.MAX_ABS_TIME_NS
                and stamps.max() <= edge_limits.MAX_ABS_TIME_NS)


def _explain_phases(report, stream: RankStream, where: str) -> None:
    """The slow, phase-by-phase check of a report the block check refused: raises the first
    problem in phase order, with the phase and the field."""
    for ph in report.phases:
        if ph.phase not in PHASE_NAMES:
            raise InvalidInput(f"{where}: unknown phase {ph.phase}")
        n = len(ph.module_id)
        for name in PHASE_COLUMNS[1:]:
            if len(getattr(ph, name)) != n:
                raise InvalidInput(f"{where} phase {PHASE_NAMES[ph.phase]}: {name} has "
                                   f"{len(getattr(ph, name))} entries, module_id has {n}")
        _module_ids(ph.module_id, stream, where)
        edge_limits.check_columns(f"{where} phase {PHASE_NAMES[ph.phase]}",
                                  (_array(ph.inclusive_ns, np.int64), _array(ph.self_ns, np.int64)),
                                  (_array(ph.first_start_ns, np.int64),
                                   _array(ph.last_end_ns, np.int64)))
    raise AssertionError("the block check refused a report the phase check accepts")


def _add_new_names(report, stream: RankStream, extend_table, where: str) -> None:
    if not report.new_module_names:
        return
    first = report.first_new_module_id
    if first > len(stream.names):
        raise InvalidInput(f"{where}: new module names start at id {first} but the rank's table "
                           f"has {len(stream.names)} names")
    new = []
    for i, name in enumerate(report.new_module_names):
        if first + i < len(stream.names):  # a replayed report re-announcing a known name
            if stream.names[first + i] != name:
                raise InvalidInput(f"{where}: module id {first + i} is {stream.names[first + i]!r}, "
                                   f"not {name!r}")
        else:
            new.append(name)
    if new:
        stream.names.extend(new)
        stream.remap = np.concatenate([stream.remap, extend_table(new)])


def _module_ids(values, stream: RankStream, where: str) -> np.ndarray:
    local = _array(values, np.int64)
    if len(local) and local.max() >= len(stream.remap):
        raise InvalidInput(f"{where}: module id {int(local.max())} is outside the rank's table of "
                           f"{len(stream.remap)} names")
    return local


def _parse_trace(report, stream: RankStream, where: str) -> dict | None:
    if not report.HasField("trace") or not len(report.trace.module_id):
        return None
    t = report.trace
    n = len(t.module_id)
    for name in TRACE_FIELDS[1:]:
        if len(getattr(t, name)) != n:
            raise InvalidInput(f"{where} trace: {name} has {len(getattr(t, name))} entries, "
                               f"module_id has {n}")
    start, end = _array(t.start_ns, np.int64), _array(t.end_ns, np.int64)
    phase = _array(t.phase, np.int64)
    if (end < start).any():
        raise InvalidInput(f"{where} trace: a call ends before it starts")
    edge_limits.check_columns(f"{where} trace", (end - start,), (start, end))
    if not np.isin(phase, list(PHASE_NAMES)).all():
        raise InvalidInput(f"{where} trace: unknown phase")
    return {"module": stream.remap[_module_ids(t.module_id, stream, where)], "phase": phase,
            "start": start, "end": end, "depth": _array(t.depth, np.uint32),
            "capture_id": t.capture_id}


def _validate_hello(h) -> None:
    if h.protocol_version not in (0, 1):
        raise InvalidInput(f"protocol_version {h.protocol_version} is not supported (want 1)")
    if not h.job:
        raise InvalidInput("Hello without a job name")
    if h.world_size < 1 or h.rank >= h.world_size:
        raise InvalidInput(f"Hello: rank {h.rank} is outside world_size {h.world_size}")


class IngestServicer(pb_grpc.CollectorServicer):
    def __init__(self, merger: Merger, store: Store, writer: StoreWriter, token: str | None = None,
                 metrics=None):
        self.merger = merger
        self.store = store
        self.writer = writer
        self.token = token
        self.metrics = metrics
        self.streams: dict[str, set] = {}  # job -> live RankStreams
        self.rejected = 0
        self.hello_timeout_s = edge_limits.HELLO_TIMEOUT_S
        self.refusals = auth.RefusalLog()
        self.stall_watch = StallWatch()  # hung jobs: the latest heartbeat of every rank

    # --- control, called from the HTTP API on the same loop -------------------------------
    def request_capture(self, job: str, steps: int) -> tuple[str, int]:
        """Ask every connected rank of `job` to trace its next `steps` steps. Returns
        (capture_id, ranks asked); KeyError for a job with no connected rank."""
        capture_id = uuid.uuid4().hex[:16]
        asked = self._control(job, pb.Control(capture=pb.CaptureTrace(capture_id=capture_id,
                                                                       steps=steps)))
        self.writer.call(self.store.add_capture, capture_id, job, steps, asked)
        return capture_id, asked

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
                        await context.abort(item.code, item.message)
                    return
                yield item
        finally:
            reader.cancel()
            if holder:
                self.streams.get(holder[0].job, set()).discard(holder[0])
                self.stall_watch.gone(holder[0].job, holder[0].rank, holder[0])  # hung jobs

    async def _read(self, request_iterator, out: asyncio.Queue, holder: list,
                    access=None) -> None:
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
                        raise InvalidInput("a second Hello on the same stream")
                    edge_limits.check_hello(msg.hello, access)
                    stream = self._hello(msg.hello, out)
                    holder.append(stream)
                elif stream is None:
                    raise InvalidInput(f"the first message must be a Hello, got {kind}")
                elif kind == "report":
                    newest_step = edge_limits.check_report(
                        msg.report, newest_step, self.merger.jobs[stream.job].last_evaluated)
                    self._report(msg.report, stream, acks)
                elif kind == "ping":
                    out.put_nowait(pb.CollectorMessage(pong=pb.ClockPong(
                        t1_ns=msg.ping.t1_ns, t2_ns=received_ns, t3_ns=time.time_ns())))
                elif kind == "clock":
                    self._clock(msg.clock, stream)
                elif kind == "heartbeat":  # hung jobs: where a rank in a long step is
                    try:
                        self.stall_watch.heartbeat(stream.job, stream.rank, msg.heartbeat, stream)
                        self.merger.jobs[stream.job].ranks[stream.rank].last_seen = time.monotonic()  # not missing
                    except BadHeartbeat as exc:
                        raise InvalidInput(f"job {stream.job!r} rank {stream.rank}: {exc}") from None
                else:
                    raise InvalidInput("an empty AgentMessage")
            acks.put_nowait(None)
            await acker  # the last reports' acks go out before the stream ends
            out.put_nowait(_End())
        except InvalidInput as exc:
            out.put_nowait(_End(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        except edge_limits.Refused as exc:
            out.put_nowait(_End(exc.code, str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store failed, or a bug: end this stream, serve the rest
            log.exception("stream failed")
            out.put_nowait(_End(grpc.StatusCode.UNAVAILABLE, f"collector error: {exc}"))
        finally:
            acker.cancel()

    def _hello(self, h, out: asyncio.Queue) -> RankStream:
        _validate_hello(h)
        job = self.merger.hello(h.job, h.rank, h.world_size, h.host, h.clock_kind)
        names = list(h.module_names)
        remap = self._extend(job.job)(names)
        stream = RankStream(h.job, h.rank, names, remap, out)
        self.streams.setdefault(h.job, set()).add(stream)
        self.writer.call(self.store.upsert_job, h.job, h.world_size)
        self.writer.call(self.store.upsert_rank, h.job, h.rank, {
            "local_rank": h.local_rank, "group_rank": h.group_rank, "host": h.host, "pid": h.pid,
            "session": h.session, "torch_version": h.torch_version,
            "agent_version": h.agent_version, "clock_kind": h.clock_kind,
            "last_seen_ns": time.time_ns(), "state": "live"})
        log.info("rank %d of job %r connected from %s (pid %d, %d modules)", h.rank, h.job,
                 h.host, h.pid, len(names))
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

    def _report(self, report, stream: RankStream, acks: asyncio.Queue) -> None:
        row = parse_report(report, stream, self._extend(stream.job))
        acks.put_nowait((row.step, self.writer.steps([row])))
        self.merger.add(row)
        info = self.merger.jobs[stream.job].ranks[stream.rank]
        info.counters = row.counters
        self._observe_rank(stream, info)

    def _clock(self, clock, stream: RankStream) -> None:
        edge_limits.check_offset(clock.offset_ns)
        info = self.merger.jobs[stream.job].ranks[stream.rank]
        info.clock_offset_ns = clock.offset_ns
        self.writer.call(self.store.upsert_rank, stream.job, stream.rank,
                         {"clock_offset_ns": clock.offset_ns, "rtt_ns": clock.rtt_ns})
        self._observe_rank(stream, info)

    def _rejected(self, reason: str) -> None:
        self.rejected += 1
        if self.metrics is not None:
            self.metrics.count_rejected(reason)

    def _observe_rank(self, stream: RankStream, info) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.observe_rank(stream.job, stream.rank, info.host,
                                      info.clock_offset_ns / 1e6, dict(info.counters))
        except Exception:
            log.exception("metrics.observe_rank failed")

    async def _ack(self, acks: asyncio.Queue, out: asyncio.Queue) -> None:
        """Cumulative acks: after each commit, one Ack for the highest step stored so far."""
        best, waiting = None, collections.deque()
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
