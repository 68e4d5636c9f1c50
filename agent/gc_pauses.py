"""Python's full garbage collections on the training thread, timed so that a pause is nobody's module time.

A full (oldest-generation) collection stops the thread that triggered it while it walks every tracked object:
tens to hundreds of ms in a large heap, at a step nobody chose, on one rank at a time — a known cause of
stragglers in synchronous training (the usual cures: `gc.freeze()` after set-up, or automatic collection off
and `gc.collect()` at the same step on every rank). Timed by module hooks alone, the pause lands in whichever
module happened to allocate when it struck, and the verdict names that module. Here each pause is stamped on
the tracker's clocks; the step's aggregation takes it out of every module window it fell in
(agent/step_accumulator.py) and reports it as the step's own figure (StepReport.gc_ns).

Young collections are left alone: they are short and alike on every rank, and there are many of them (the
callback returns at its first test for those). Collections on other threads (the sender's) stop the training
thread too but not its CPU clock: they are not the training thread's pauses.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable

from modtrack.agent.position import DATA, OUTSIDE

FULL = 2  # gc's oldest generation
_IN_DATA_NS = (DATA, OUTSIDE)  # positions outside forward, backward and optimizer: the step's data_ns
MAX_PAUSES_PER_STEP = 4096  # a loop of gc.collect() calls in one step: the rest are counted, not kept


class GcPauses:
    """Installs a `gc.callbacks` entry while tracking; each full collection on the training thread appends
    [work start, work end, wall start, wall end, outside every phase (1/0)] to `pauses`, the step in progress's
    (the tracker takes them at the step's end)."""

    def __init__(self, work: Callable[[], int], position, counters: dict) -> None:
        self._work = work  # the tracker's work clock (thread CPU time, or wall)
        self._position = position  # agent.position.Position: the training thread, and where it is
        self._counters = counters
        self.pauses: list[list[int]] = []
        self._start: tuple[int, int] | None = None
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            self.pauses = []  # none left from an earlier tracking block
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def remove(self) -> None:
        if self._installed:
            self._installed = False
            try:
                gc.callbacks.remove(self._on_gc)
            except ValueError:  # a user cleared gc.callbacks
                pass

    def take(self, end_ns: int) -> list[list[int]]:
        """The pauses of the step that ends at `end_ns` (perf_counter_ns; for its StepLog.gc); those begun after
        it stay, the next step's (a step ends when the next begins, at its last optimizer step's end)."""
        pauses = self.pauses
        self.pauses = [p for p in pauses if p[2] >= end_ns]
        return [p for p in pauses if p[2] < end_ns] if self.pauses else pauses

    def _on_gc(self, phase: str, info: dict) -> None:
        if info["generation"] != FULL:
            return
        try:
            position = self._position
            if threading.get_ident() != position.thread_id:
                return
            if phase == "start":
                self._start = (time.perf_counter_ns(), self._work())  # the work clock last: nearest the pause
                return
            work_end = self._work()
            wall_end = time.perf_counter_ns()
            start, self._start = self._start, None
            if start is None:
                return
            if len(self.pauses) >= MAX_PAUSES_PER_STEP:
                self._counters["gc_pauses_dropped"] = self._counters.get("gc_pauses_dropped", 0) + 1
                return
            outside = int(position.phase in _IN_DATA_NS)
            self.pauses.append([start[1], work_end, start[0], wall_end, outside])
        except Exception:  # a gc callback must never raise: Python would print it on every collection
            self._counters["hook_errors"] += 1
