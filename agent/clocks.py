"""The tracker's clocks: what a hook stamps, and how stamps become nanoseconds.

A hook calls `clock.stamp()` and keeps the integer it returns: a *timestamp* (when a call began or
ended, for timelines and first start / last end). On CPU that integer already is
`time.perf_counter_ns()`. On CUDA a host timestamp only says when a kernel was *launched*, so the
CUDA clock records a pooled `torch.cuda.Event` on the current stream and returns its index; the
events are turned into times later, off the hot path, once the GPU has passed them. No hook ever
waits for the GPU.

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

import logging
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
    """The events of one step, resolvable to nanoseconds once the GPU has passed the last one.

    Times are reported on the host clock: `ref_host_ns` (perf_counter_ns when the reference event
    was recorded) plus the GPU time elapsed since the reference event.
    """

    def __init__(self, ref, ref_host_ns: int, events: list, give_back: Callable[[list], None]):
        self.ref = ref
        self.ref_host_ns = ref_host_ns
        self.events = events  # events[0] is None: token 0 means "never stamped"
        self._give_back = give_back

    def wait(self) -> None:
        """Block until the GPU has passed this step's last event. Only at close, never in a hook."""
        (self.events[-1] if len(self.events) > 1 else self.ref).synchronize()

    def resolve(self) -> np.ndarray | None:
        """ns for every token (index), or None while the GPU has not reached the last event."""
        last = self.events[-1] if len(self.events) > 1 else self.ref
        if not last.query():
            return None
        ref = self.ref
        try:
            ms = [0.0] + [ref.elapsed_time(ev) for ev in self.events[1:]]
        except RuntimeError:  # an event on another stream is not done yet: try again next step
            return None
        table = self.ref_host_ns + np.round(np.asarray(ms) * 1e6).astype(np.int64)
        table[0] = 0
        self.release()
        return table

    def release(self) -> None:
        self._give_back([self.ref, *self.events[1:]])
        self.events = [None]


class CudaEventClock:
    """Stamps are indices of events recorded on the current CUDA stream.

    `event_factory` makes a new timing event; tests on CPU pass a fake one.
    """

    kind = "cuda"
    durations = "events"

    def __init__(self, event_factory: Callable[[], object] | None = None) -> None:
        if event_factory is None:
            import torch

            def event_factory():
                return torch.cuda.Event(enable_timing=True)

        self._new_event = event_factory
        self._pool: list = []
        self.created = 0
        self._open()

    def _take(self):
        if self._pool:
            return self._pool.pop()
        self.created += 1
        return self._new_event()

    def _open(self) -> None:
        self._events: list = [None]
        self._ref = self._take()
        self._ref.record()
        self._ref_host_ns = time.perf_counter_ns()

    @staticmethod
    def work_stamp() -> int:
        """Durations come from the events themselves: nothing else to stamp."""
        return 0

    def stamp(self) -> int:
        ev = self._take()
        ev.record()
        events = self._events
        events.append(ev)
        return len(events) - 1

    def close_step(self) -> EventBatch:
        """Hand over this step's events and start the next step's."""
        batch = EventBatch(self._ref, self._ref_host_ns, self._events, self._pool.extend)
        self._open()
        return batch

    def pending_events(self) -> int:
        return len(self._events) - 1


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
