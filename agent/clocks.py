"""The tracker's clocks: what a hook stamps, and how stamps become nanoseconds.

A hook calls `clock.stamp()` and keeps the integer it returns: a *timestamp* (when a call began or
ended, for timelines and first start / last end). On CPU that integer already is
`time.perf_counter_ns()`. On CUDA a host timestamp only says when a kernel was *launched*, so the
CUDA clock records a pooled `torch.cuda.Event` on the current stream and returns its index; the
events travel with the step's record and are turned into times on the sender thread, once the GPU
has passed them. No hook, and nothing else on the training thread, ever waits for the GPU.

On CPU a module call also takes `clock.work_stamp()`, and its duration (inclusive and self time) is
the difference of those: by default the calling thread's CPU time (`time.thread_time_ns`). CPU
forward and backward run on the thread that calls them, so that is the compute the module did; wall
time would also count the milliseconds the OS gave another process in the middle of the call (ranks
sharing cores) and time blocked in a collective, and make a rank look slow that is not.

Which CPU-time read is cheapest was measured, not guessed (Linux 6.x, 2-core x86-64 VM, Python 3.11, ns per
call): perf_counter_ns 47 and monotonic_ns 47 (vDSO), thread_time_ns 560, clock_gettime_ns(CLOCK_THREAD_CPUTIME_ID)
645, process_time_ns 584, resource.getrusage(RUSAGE_THREAD) 492 before its fields are read. The kernel serves no
CPU-time clock from the vDSO, so every CPU-time read is a syscall; thread_time_ns is the cheapest one that gives an
int of nanoseconds. Deriving a read from the previous one plus the wall time since (when the two are < 20 us apart)
was measured too: it skips only 35-45 % of the reads on tiny HF models (the hooks themselves keep boundaries
further apart than that) and saves ~45 ns per stamp there, not worth the preemption it could hide. Where the
thread CPU clock is coarse (Windows counts it in 15.6 ms scheduler ticks), durations fall back to wall time:
a 20 us module would otherwise read 0 or 15 ms.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

# A thread CPU clock coarser than this cannot time module calls (they take microseconds).
MAX_CPU_CLOCK_STEP_NS = 50_000


def cpu_clock_step_ns(read: Callable[[], int] = time.thread_time_ns, budget_ns: int = 2_000_000) -> int:
    """The smallest increment `read` shows while this thread spins (at most `budget_ns` of wall time): its
    effective resolution. Returns budget_ns when it never moved."""
    step = budget_ns
    changes = 0
    deadline = time.perf_counter_ns() + budget_ns
    last = read()
    while changes < 5 and time.perf_counter_ns() < deadline:
        now = read()
        if now != last:
            step = min(step, now - last)
            changes += 1
            last = now
    return step


class CpuClock:
    """Stamps are perf_counter_ns values; nothing to resolve.

    Durations come from `work_stamp`: the thread's CPU time ("thread", the default), or wall time
    ("wall"). Thread CPU time counts this thread only: with `torch.set_num_threads(n > 1)` the work
    intra-op (OpenMP) threads do for a module is partly missing (the calling thread's share, and its
    spin at the end of a parallel region, are counted), and a rank slowed because other processes
    take its cores is not seen in module times (its step wall time still shows it). "wall" counts
    everything that happened between a call's start and end, as the seed's users would expect.
    """

    kind = "cpu"

    def __init__(self, durations: str = "thread") -> None:
        if durations not in ("thread", "wall"):
            raise ValueError(f"durations must be 'thread' or 'wall', not {durations!r}")
        if durations == "thread" and cpu_clock_step_ns() > MAX_CPU_CLOCK_STEP_NS:
            logger.warning(
                "modtrack: this platform's thread CPU clock is too coarse to time module calls; "
                "module durations are wall time"
            )
            durations = "wall"
        self.durations = durations
        self.stamp: Callable[[], int] = time.perf_counter_ns
        self.work_stamp: Callable[[], int] = time.thread_time_ns if durations == "thread" else time.perf_counter_ns

    def close_step(self) -> None:
        return None

    def pending_events(self) -> int:
        return 0


class EventBatch:
    """The events of one step, resolved to nanoseconds on the sender thread once the GPU has passed them.

    `block[0]` is the reference event, recorded when the step began (host time `ref_host_ns`); token i is
    `block[i]`, i < `count`. Times are reported on the host clock: `ref_host_ns` plus the GPU time elapsed
    since the reference event. Once resolved (or dropped unresolved) the block goes back to the clock's pool.
    """

    __slots__ = ("_give_back", "block", "count", "ref_host_ns", "resolved_on")

    def __init__(self, block: list, count: int, ref_host_ns: int, give_back: Callable[[list], None]):
        self.block: list | None = block
        self.count = count
        self.ref_host_ns = ref_host_ns
        self._give_back = give_back
        self.resolved_on: int | None = None  # the thread that resolved it (tests check it is the sender)

    def ready(self) -> bool:
        """The GPU has passed the step's last event (a query, never a wait)."""
        block = self.block
        return block is None or block[self.count - 1].query()

    def wait(self) -> None:
        """Block until the GPU has passed this step's last event: only for a reader that asks for the figures
        now (last_step()); the sender resolves only batches that are ready()."""
        if self.block is not None:
            self.block[self.count - 1].synchronize()

    def resolve(self) -> np.ndarray | None:
        """ns for every token (index; token 0 reads 0), waiting for the GPU if it must; None once released."""
        block = self.block
        if block is None:
            return None
        events = block[1 : self.count]
        ref = block[0]
        try:
            ms = [ref.elapsed_time(ev) for ev in events]
        except RuntimeError:  # an event on another stream is not done yet: wait for each (off the hot path)
            for ev in events:
                ev.synchronize()
            ms = [ref.elapsed_time(ev) for ev in events]
        table = np.empty(self.count, dtype=np.int64)
        table[0] = 0
        table[1:] = self.ref_host_ns + np.round(np.asarray(ms, dtype=np.float64) * 1e6).astype(np.int64)
        self.resolved_on = threading.get_ident()
        self.release()
        return table

    def release(self) -> None:
        block, self.block = self.block, None
        if block is not None:
            self._give_back(block)

    def __del__(self) -> None:  # dropped unresolved (a full queue): the events still go back to the pool
        try:
            self.release()
        except Exception:
            pass


class CudaEventClock:
    """Stamps are indices of events recorded on the current CUDA stream, one event per stamp.

    Events are pooled: a step takes a block (a list of events, grown only until it fits the largest step),
    stamps record `block[1], block[2], ...` by an index counter, and the step's EventBatch gives the block
    back once the sender has resolved it. After the first steps no stamp allocates anything. The tracker
    stamps once per boundary (every call that starts or ends there shares the token).

    `event_factory` makes a new timing event; tests on CPU pass a fake one (then events are recorded with
    their own `record()`).
    """

    kind = "cuda"
    durations = "events"

    def __init__(self, event_factory: Callable[[], object] | None = None) -> None:
        record = None
        if event_factory is None:
            import torch

            def event_factory():
                return torch.cuda.Event(enable_timing=True)

            try:
                record = current_stream_recorder()
            except Exception:  # a torch without these internals: Event.record() it is
                record = None
        self._new_event = event_factory
        self._record: Callable[[object], None] = record or _record_with_event
        self._free: collections.deque = collections.deque()  # blocks given back (by the sender thread)
        self.created = 0
        self._open()

    def _event(self):
        self.created += 1
        return self._new_event()

    def _open(self) -> None:
        free = self._free
        block = free.pop() if free else [self._event()]
        self._block = block
        self._count = 1
        self._record_at(block, 0)
        self._ref_host_ns = time.perf_counter_ns()

    def _record_at(self, block: list, i: int) -> None:
        try:
            self._record(block[i])
        except RuntimeError:  # an event first recorded on another device (set_device after tracking began)
            block[i] = self._event()
            self._record(block[i])

    @staticmethod
    def work_stamp() -> int:
        """Durations come from the events themselves: nothing else to stamp."""
        return 0

    def stamp(self) -> int:
        n = self._count
        block = self._block
        if n == len(block):
            block.append(self._event())  # only while the pool grows to the largest step
        try:
            self._record(block[n])
        except RuntimeError:
            self._record_at(block, n)
        self._count = n + 1
        return n

    def close_step(self) -> EventBatch:
        """Hand over this step's events (resolved later, on the sender thread) and start the next step's."""
        batch = EventBatch(self._block, self._count, self._ref_host_ns, self._free.append)
        self._open()
        return batch

    def pending_events(self) -> int:
        return self._count - 1


def _record_with_event(event) -> None:
    event.record()


def current_stream_recorder() -> Callable[[object], None]:
    """Records an event on the current stream without `torch.cuda.Event.record()`'s Python path (which builds
    a new Stream object each time): one Stream per (stream id, device) is kept."""
    import torch

    torch.cuda.init()  # what Event.record() would do first
    base_record = torch._C._CudaEventBase.record
    get_device = torch._C._cuda_getDevice
    get_stream = torch._C._cuda_getCurrentStream
    streams: dict = {}

    def record(event) -> None:
        key = get_stream(get_device())
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])
        base_record(event, stream)

    return record


def make_clock(kind="auto"):
    """ "cpu" (durations in thread CPU time), "wall" (CPU, durations in wall time), "cuda", "auto"
    (cuda when available, else cpu), or a clock object (tests pass a CudaEventClock built on fake
    events)."""
    if not isinstance(kind, str):
        return kind
    if kind == "auto":
        import torch

        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return CpuClock()
    if kind == "wall":
        return CpuClock(durations="wall")
    if kind == "cuda":
        return CudaEventClock()
    raise ValueError(f"clock must be 'cpu', 'wall', 'cuda' or 'auto', not {kind!r}")
