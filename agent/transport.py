"""The agent's background sender: step records out, acks, clock pongs and controls in.

The training thread only calls submit(), which appends the step, not yet aggregated, to a
bounded deque (dropping the oldest, counted) and never touches the network nor wakes anyone:
the sender wakes on its own a few times a second (or early, once many steps wait), aggregates
every waiting step in one numpy pass (agent.step_accumulator.build_step_records), encodes them into
one StepReportBatch and sends it as one gRPC message. So the training thread pays neither the
aggregation nor a thread switch per step, and gRPC's per-message cost is paid per flush, not per step.
One daemon thread owns the gRPC channel: it connects with exponential backoff and jitter, sends
a Hello with the whole module table, replays what the collector has not acknowledged yet, then
streams new reports; between connections it keeps aggregating, so raw steps never pile up.
Nothing here may keep the process alive: the thread is a daemon and close() (run at exit) waits
at most a couple of seconds, and only while a collector is connected or still being reached.
"""

from __future__ import annotations

import collections
import copy
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from modtrack.agent.clock_sync import ClockSync
from modtrack.agent.grpc_import import grpc
from modtrack.agent.identity import Identity
from modtrack.agent.report_codec import encode_hello, fill_report, wire_bytes_bound
from modtrack.agent.step_accumulator import build_step_records
from modtrack.agent.step_record import StepRecord
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc
from modtrack.protos.backoff import backoff_delays

if TYPE_CHECKING:
    from modtrack.agent.collectives import Collectives
    from modtrack.agent.gpu_health import GpuHealthSampler
    from modtrack.agent.heartbeat import Heartbeat


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One stderr line per kind of problem, so the agent never floods the job's output."""
    if key in _warned:
        return
    _warned.add(key)
    try:
        # One write, not print's two (text, then newline): a traceback the job prints from another
        # thread at the same moment can then never end up between this line and its newline.
        sys.stderr.write(f"modtrack: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


# Module calls held by steps waiting for aggregation, at most (~400 bytes each): a loop of 100,000-call
# steps (see agent.tracker.MAX_CALLS_PER_STEP) with a stuck sender must not take gigabytes.
RAW_CALLS = 200_000

# One message holds at most this many steps and (by wire_bytes_bound) bytes: far below the collector's
# bounds (1024 reports, 16 MiB per message); a single step larger than that still goes, alone.
MAX_BATCH_REPORTS = 256
MAX_BATCH_BYTES = 4 * 1024 * 1024
# A stream the collector refused for one report carries its step in this trailing metadata key.
REFUSED_STEP_KEY = "modtrack-refused-step"

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),  # notice a dead collector host within a minute
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),  # trace captures can be large
]


class _Sent:
    """One message sent and not acknowledged yet: a StepReportBatch and its steps, in order."""

    __slots__ = ("steps", "last", "message", "sent_at")

    def __init__(self, steps: list[int], message: pb.AgentMessage, sent_at: float):
        self.steps = steps
        self.last = max(steps)
        self.message = message
        self.sent_at = sent_at

    def drop(self, index: int) -> None:
        """Without its report at `index` (refused, or the oldest over the replay bound)."""
        del self.steps[index]
        del self.message.reports.reports[index]
        if self.steps:
            self.last = max(self.steps)


class _Stream:
    """State of one connection: what the request generator and the reader share."""

    def __init__(self):
        self.done = False
        self.clock_to_send = None
        self.call = None


class Transport:
    def __init__(
        self,
        target: str,
        identity: Identity,
        *,
        clock_kind: str = "cpu",
        token: str | None = None,
        tls_ca: bytes | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
        on_capture: Callable[[str, int], None] | None = None,
        on_sampling: Callable[[int], None] | None = None,
        hook_errors: Callable[[], int] = lambda: 0,
        queue_size: int = 256,
        replay_size: int = 1024,
        raw_size: int = 64,
        flush_interval_s: float = 0.25,  # 4 messages a second: gRPC's per-message cost is paid per flush
        wake_after: int = 32,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 15.0,
        connect_timeout_s: float = 5.0,
        ping_interval_s: float = 5.0,
        ack_timeout_s: float = 30.0,
    ):
        self.target = target
        self.identity = identity
        self.clock_kind = clock_kind
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._tls_ca = tls_ca
        self._clock = clock
        self._on_capture = on_capture
        self._on_sampling = on_sampling
        self._hook_errors = hook_errors
        self._queue_size = queue_size
        self._replay_size = replay_size
        self._raw_size = raw_size
        self._flush_interval_s = flush_interval_s
        self._wake_after = wake_after
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._connect_timeout_s = connect_timeout_s
        self._ping_interval_s = ping_interval_s
        self._ack_timeout_s = ack_timeout_s

        # Steps as the tracker hands them over (not aggregated yet: they hold every module call), then,
        # aggregated by the sender, waiting to be sent. Both bounded: the oldest is dropped, counted.
        self._raw: collections.deque[StepRecord] = collections.deque()
        self._queue: collections.deque[StepRecord] = collections.deque()
        self._build_lock = threading.Lock()
        self._sending = False  # a report is between the queue and the replay buffer
        self._names: list[str] = []  # module table, learned from submitted records
        self._replay: collections.deque[_Sent] = collections.deque()
        self._replay_count = 0  # steps held in _replay
        self._replay_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        # Set while a stream is open but the collector has not answered yet: close() waits for a
        # collector still being reached (a short job), not for one that refused (the call failed).
        self._reaching = threading.Event()
        self._started_session = False  # before the sender's first session, close() may wait too
        self._paused = False
        # False once a collector older than StepReportBatch refused one: then one report per message
        self._batches = True
        self._clock_sync = ClockSync()
        self._stream: _Stream | None = None
        # Each counter has one writer thread, so plain ints need no lock.
        self._queue_dropped = 0  # training thread
        self._built_dropped = 0  # sender thread
        self._replay_dropped = 0  # sender thread
        self._wakes = 0  # sender thread: times it woke to aggregate and send
        self._reconnects = 0
        self._send_errors = 0
        self._sent = 0
        self._acked_step = -1
        self.collectives: Collectives | None = None  # agent.collectives.Collectives: stats attached per batch
        self._last_built: StepRecord | None = None  # the newest record built: resent at close with the last stats
        self.heartbeat: Heartbeat | None = (
            None  # agent.heartbeat.Heartbeat: polled by the request loop (issue 14: hung jobs)
        )
        self.gpu_health: GpuHealthSampler | None = None  # puts GPU samples on reports (issue 15)
        self._thread = threading.Thread(target=self._run, name="modtrack-sender", daemon=True)

    # ---- training thread -------------------------------------------------------------
    def submit(self, record: StepRecord) -> None:
        """Hand over one step; O(1), never blocks, never raises, and wakes the sender only once
        `wake_after` steps wait (it wakes by itself every `flush_interval_s`)."""
        try:
            if record.new_module_names:
                self._learn_names(record.first_new_module_id, record.new_module_names)
            raw, queue = self._raw, self._queue
            held = len(raw)
            if held >= self._raw_size or held * getattr(record, "raw_calls", 0) >= RAW_CALLS:
                oldest = raw  # the sender is stuck: keep memory bounded, in steps and in module calls held raw
            elif held + len(queue) >= self._queue_size:
                oldest = queue if queue else raw
            else:
                oldest = None
            if oldest is not None:
                try:
                    oldest.popleft()
                    self._queue_dropped += 1
                except IndexError:
                    pass  # the sender took it meanwhile
            raw.append(record)
            if len(raw) >= self._wake_after:
                self._wake.set()
        except Exception:
            self._queue_dropped += 1

    def _learn_names(self, first: int, names: list[str]) -> None:
        table = self._names
        if first > len(table):
            table.extend([""] * (first - len(table)))
        table.extend(names[len(table) - first :])

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> Transport:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush what the collector can still take, then stop; bounded by timeout_s.

        Waits only while a collector is connected, or still being reached for the first time
        (a job shorter than the connect): a refused or failing link ends the wait at once.
        """
        deadline = time.monotonic() + timeout_s
        if self.collectives is not None:
            self._final_collectives()
        while self._thread.is_alive() and time.monotonic() < deadline and self._has_unsent():
            if not (self._connected.is_set() or self._reaching.is_set() or not self._started_session):
                break
            self._wake.set()
            time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        try:
            stream = self._stream
            if stream is not None and stream.call is not None:
                stream.call.cancel()
        except Exception:
            pass
        if self._thread.is_alive():
            self._thread.join(max(0.0, min(0.5, deadline - time.monotonic())))

    def _final_collectives(self) -> None:
        """The last steps' collective stats (agent/collectives.py `final`) ride the last report still queued, or
        a copy of the last one built: a report sent twice stores nothing new, and its stats are read."""
        try:
            self._build_waiting()
            stats = self.collectives.final() if self.collectives is not None else []
            with self._build_lock:
                carrier = self._queue[-1] if self._queue else copy.copy(self._last_built)
                if not stats or carrier is None:
                    return
                carrier.collectives = [*carrier.collectives, *stats]
                if not self._queue:
                    self._queue.append(carrier)
            self._wake.set()
        except Exception as e:
            warn_once("final-collectives", f"could not send the last collective stats: {type(e).__name__}: {e}")

    def _has_unsent(self) -> bool:
        with self._build_lock:  # not while a batch is between the raw and the built queue
            if self._raw or self._queue or self._sending:
                return True
        with self._replay_lock:
            return bool(self._replay)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def clock_offset(self):
        """The best ClockSample of the current connection (None before the first pong)."""
        return self._clock_sync.best

    @property
    def counters(self) -> dict[str, int]:
        """The AgentCounters fields, cumulative since start."""
        return {
            "reports_dropped": self._queue_dropped + self._built_dropped + self._replay_dropped,
            "reconnects": self._reconnects,
            "hook_errors": int(self._safe_hook_errors()),
            "send_errors": self._send_errors,
            "heartbeat_errors": self.heartbeat.errors if self.heartbeat is not None else 0,
        }

    @property
    def stats(self) -> dict[str, int]:
        return {
            **self.counters,
            "reports_sent": self._sent,
            "acked_step": self._acked_step,
            "queued": len(self._raw) + len(self._queue),
            "unacked": self._replay_count,
            "wakes": self._wakes,
        }

    def _safe_hook_errors(self) -> int:
        try:
            return self._hook_errors()
        except Exception:
            return 0

    # ---- sender thread -------------------------------------------------------------------
    def _run(self) -> None:
        delays = backoff_delays(*self._backoff, jitter=0.5)
        ever_connected = False
        while not self._stop.is_set():
            try:
                got_through = self._session(ever_connected)
            except Exception as e:  # never let the thread die on a surprise
                self._send_errors += 1
                warn_once(f"sender-{type(e).__name__}", f"sender error {type(e).__name__}: {e}")
                got_through = False
            if got_through:
                ever_connected = True
                delays = backoff_delays(*self._backoff, jitter=0.5)  # from the first delay again
            if self._stop.is_set():
                break
            self._idle(next(delays))

    def _idle(self, seconds: float) -> None:
        """Wait between connections, aggregating what arrives (raw steps are large: never let them pile up)."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            self._build_waiting()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, self._flush_interval_s))

    def _build_waiting(self) -> None:
        """Aggregate every raw step in one pass and queue it for sending (sender side only)."""
        with self._build_lock:
            raw = self._raw
            if not raw:
                return
            self._wakes += 1
            batch = []
            while raw and getattr(raw[0], "ready", True):  # CUDA: only steps whose GPU work is done, in order
                batch.append(raw.popleft())
            if not batch:
                return
            try:
                build_step_records(batch)
            except Exception as e:  # counted when encoding each of them fails
                warn_once("build", f"could not aggregate steps: {type(e).__name__}: {e}")
            if self.collectives is not None:
                self.collectives.attach(batch)  # never raises
            queue = self._queue
            queue.extend(batch)
            self._last_built = batch[-1]
            while queue and len(queue) + len(raw) > self._queue_size:
                queue.popleft()
                self._built_dropped += 1

    def _channel(self) -> grpc.Channel:
        # gRPC reads its per-attempt connect deadline from this (oddly named) argument
        options = [*_CHANNEL_OPTIONS, ("grpc.min_reconnect_backoff_ms", int(self._connect_timeout_s * 1000))]
        if self._tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self._tls_ca)
            return grpc.secure_channel(self.target, creds, options=options)
        return grpc.insecure_channel(self.target, options=options)

    def _session(self, ever_connected: bool) -> bool:
        """One connection, from connect to failure.

        True when the collector answered anything: only then is the backoff reset, so a
        collector that accepts and drops every stream is not hammered.
        """
        channel = self._channel()
        stream = _Stream()
        self._reaching.set()
        self._started_session = True
        try:
            if self._stop.is_set():
                return False
            self._paused = False  # a (re)started collector re-sends Pause if it wants one
            self._clock_sync.reset()
            self._stream = stream
            stub = pb_grpc.CollectorStub(channel)
            # No wait_for_ready: a refused connection fails the call at once (UNAVAILABLE), and no
            # connectivity poller thread is started (gRPC's poller races with channel.close()
            # and with interpreter exit, printing tracebacks into the user's stderr).
            stream.call = stub.Stream(self._requests(stream), metadata=self._metadata)
            answered = False
            try:
                for message in stream.call:
                    if not answered:
                        answered = True
                        self._connected.set()
                        self._reaching.clear()
                        if ever_connected:
                            self._reconnects += 1
                    self._handle(message, stream)
            except grpc.RpcError as e:
                if not self._stop.is_set():
                    self._send_errors += 1
                    code = e.code() if hasattr(e, "code") else None
                    if code == grpc.StatusCode.INVALID_ARGUMENT and self._batches and _old_collector(e):
                        self._batches = False  # not poison: the collector predates StepReportBatch
                        warn_once("old-collector", f"collector {self.target} takes one report per message")
                        return answered
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        self._drop_poison(_refused_step(e))
                    if code == grpc.StatusCode.UNAUTHENTICATED:
                        warn_once("auth", f"collector {self.target} refused the token: {e.details()}")
                    elif not answered and code == grpc.StatusCode.UNAVAILABLE:
                        warn_once("unreachable", f"collector {self.target} unreachable; training goes on, retrying")
                    else:
                        warn_once(
                            f"stream-{code}", f"stream to {self.target} broke ({code}: {e.details()}); reconnecting"
                        )
            return answered
        finally:
            stream.done = True
            self._reaching.clear()
            self._connected.clear()
            self._wake.set()
            try:
                channel.close()
            except Exception:
                pass

    def _handle(self, message: pb.CollectorMessage, stream: _Stream) -> None:
        kind = message.WhichOneof("body")
        if kind == "ack":
            step = message.ack.step
            with self._replay_lock:
                replay = self._replay
                while replay and replay[0].last <= step:
                    self._replay_count -= len(replay.popleft().steps)
            self._acked_step = max(self._acked_step, step)
        elif kind == "pong":
            pong = message.pong
            sample = self._clock_sync.add(pong.t1_ns, pong.t2_ns, pong.t3_ns, self._clock())
            if sample is not None:
                stream.clock_to_send = sample
                self._wake.set()
        elif kind == "control":
            control = message.control
            action = control.WhichOneof("action")
            if action == "capture" and self._on_capture is not None:
                try:
                    self._on_capture(control.capture.capture_id, control.capture.steps)
                except Exception as e:
                    warn_once("capture", f"trace capture failed: {e}")
            elif action == "sampling" and self._on_sampling is not None:
                try:
                    self._on_sampling(control.sampling.every_n_steps)
                except Exception as e:
                    warn_once("sampling", f"sampled mode change failed: {e}")
            elif action == "pause":
                self._paused = True
            elif action == "resume":
                self._paused = False
                self._wake.set()

    def _drop_poison(self, step: int | None) -> None:
        """The collector refused a report: drop it (the step it named, else the oldest unacked one) so a
        replay cannot loop on it; the rest of its batch is replayed."""
        with self._replay_lock:
            replay = self._replay
            at = next(((e, e.steps.index(step)) for e in replay if step in e.steps), None) if step is not None else None
            if at is None and replay:
                at = (replay[0], 0)
            if at is not None:
                entry, index = at
                entry.drop(index)
                if not entry.steps:
                    replay.remove(entry)
                self._replay_count -= 1
                self._replay_dropped += 1

    def _remember(self, entry: _Sent) -> None:
        """Keep a sent batch until it is acked; the oldest steps beyond replay_size are dropped, counted."""
        with self._replay_lock:
            replay = self._replay
            replay.append(entry)
            self._replay_count += len(entry.steps)
            while self._replay_count > self._replay_size:
                oldest = replay[0]
                excess = self._replay_count - self._replay_size
                if len(oldest.steps) <= excess:
                    replay.popleft()
                    gone = len(oldest.steps)
                else:
                    for _ in range(excess):
                        oldest.drop(0)
                    gone = excess
                self._replay_count -= gone
                self._replay_dropped += gone

    def _take_batch(self) -> list[StepRecord]:
        """The waiting steps that go in the next message, bounded in steps and bytes, and never more than the
        replay buffer holds (so trimming it drops older messages' steps, never this one's module names)."""
        queue, size = self._queue, 0
        records: list[StepRecord] = []
        most = max(1, min(MAX_BATCH_REPORTS, self._replay_size))
        while queue and len(records) < most:
            try:
                record = queue[0]
            except IndexError:
                break  # the training thread dropped it meanwhile
            size += wire_bytes_bound(record)
            if records and size > MAX_BATCH_BYTES:
                break
            try:
                queue.popleft()
            except IndexError:
                break
            records.append(record)
        return records

    def _encode(self, records: list[StepRecord], counters: dict[str, int]) -> tuple[pb.AgentMessage, list[int]]:
        """One StepReportBatch of `records`, each report filled in place; one that fails is left out, counted."""
        message = pb.AgentMessage()
        reports = message.reports.reports
        steps = []
        for record in records:
            report = reports.add()
            try:
                fill_report(report, record, counters)
                if self.gpu_health is not None:  # the GPU sample taken during this step, if any
                    self.gpu_health.attach(report, record.end_ns)
            except Exception as e:
                del reports[-1]
                self._send_errors += 1
                warn_once("encode", f"could not encode step {record.step}: {e}")
                continue
            steps.append(record.step)
        return message, steps

    def _requests(self, stream: _Stream):
        """The outgoing side of one stream (runs on a gRPC thread)."""
        names = list(self._names)
        told = len(names)
        yield encode_hello(self.identity, names, self.clock_kind)
        with self._replay_lock:  # replayed now, so the ack clock starts now
            now = time.monotonic()
            for entry in self._replay:
                entry.sent_at = now
            backlog = [entry.message for entry in self._replay]
        for message in backlog:
            if stream.done:
                return
            yield from self._on_wire(message)
        fast_pings = 4  # a few quick pings at connect for a good first offset
        next_ping = 0.0
        while not stream.done and not self._stop.is_set():
            self._wake.clear()
            now = time.monotonic()
            if now >= next_ping:
                yield pb.AgentMessage(ping=pb.ClockPing(t1_ns=self._clock()))
                next_ping = now + (0.02 if fast_pings > 0 else self._ping_interval_s)
                fast_pings -= 1
            sample = stream.clock_to_send
            if sample is not None:
                stream.clock_to_send = None
                yield pb.AgentMessage(clock=pb.ClockOffset(offset_ns=sample.offset_ns, rtt_ns=sample.rtt_ns))
            beat = self.heartbeat.poll() if self.heartbeat is not None else None  # heartbeat: a long step
            if beat is not None:
                yield pb.AgentMessage(heartbeat=beat)
            self._build_waiting()
            counters = self.counters  # once per batch: the same for every report in it
            while self._queue and not self._paused and not stream.done:
                self._sending = True
                message, steps = self._encode(self._take_batch(), counters)
                if not steps:
                    self._sending = False
                    continue
                if len(self._names) > told:  # names whose step was dropped still get told
                    table = self._names[told:]
                    report = message.reports.reports[0]
                    report.first_new_module_id = told
                    del report.new_module_names[:]
                    report.new_module_names.extend(table)
                    told += len(table)
                self._remember(_Sent(steps, message, time.monotonic()))
                self._sending = False
                self._sent += len(steps)
                yield from self._on_wire(message)
            if self._stalled():
                warn_once("stalled", f"collector {self.target} stopped acknowledging; reconnecting")
                if stream.call is not None:
                    stream.call.cancel()
                return
            self._wake.wait(max(0.001, min(self._flush_interval_s, next_ping - time.monotonic())))

    def _on_wire(self, message: pb.AgentMessage):
        """A batch as it goes out: whole, or one report per message to a collector that predates batches."""
        if self._batches:
            yield message
        else:
            for report in message.reports.reports:
                yield pb.AgentMessage(report=report)

    def _stalled(self) -> bool:
        with self._replay_lock:
            oldest = self._replay[0].sent_at if self._replay else None
        return oldest is not None and time.monotonic() - oldest > self._ack_timeout_s


def _refused_step(error) -> int | None:
    """The step of the report a collector refused, from the stream's trailing metadata (None: not said)."""
    try:
        for key, value in error.trailing_metadata() or ():
            if key == REFUSED_STEP_KEY:
                return int(value)
    except Exception:
        pass
    return None


def _old_collector(error) -> bool:
    """A collector that predates StepReportBatch sees no known field in one, and says so."""
    try:
        return "an empty AgentMessage" in (error.details() or "")
    except Exception:
        return False
