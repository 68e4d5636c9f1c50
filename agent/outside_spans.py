"""How long the training thread was blocked in the loop's own code between a step's phases (StepReport.host_wait_ns).

Time outside forward, backward and the optimizer is the loop's own code (StepReport.host_ns) or data loading. Part
of that code can be a wait: gradient clipping under FSDP all-reduces the gradients' norm (HF Trainer, Lightning and
torchtitan clip by default), and a logging all-reduce of the loss or a barrier waits too. There every rank waits for
the last one, so by wall time the rank slow before the clip and its peers, which waited for it, spent the same time
there, and nobody looked slow. On the CPU clock the thread's CPU time tells them apart, as it does inside modules:
the slow rank ran its code, its peers did not run (a gloo all-reduce's wait costs ~0.15 ms of CPU in 43 ms).

So each stretch of the training thread outside every phase is stamped at both ends on the wall and the thread CPU
clock, with what began and ended it (a forward, a backward pass, an optimizer step, the step's boundary): about
six clock reads per step. Only on the thread CPU clock; with wall durations or CUDA events nothing is stamped and
the wait reads 0, as from agents before this field.
"""

from __future__ import annotations

import threading
import time

# What began or ended a stretch outside the phases.
START, FORWARD, PASS, OPTIMIZER = range(4)
# Stretches counted as the loop's own code when no DataLoader fetch says which part is loading (as
# agent/step_accumulator.py's _loop_code_ns): forward end -> backward start, backward end -> optimizer start.
LOOP_CODE = ((FORWARD, PASS), (PASS, OPTIMIZER))
MAX_SPANS_PER_STEP = 4096  # a step with more phases than this (thousands of micro-batches) keeps the first ones


class OutsideSpans:
    """The step in progress's stretches outside its phases: (wall start, wall end, CPU start, CPU end, began by,
    ended by); the tracker calls `end` when a phase begins and `begin` when one ends (training thread only)."""

    __slots__ = ("_counters", "_open", "_position", "enabled", "spans")

    def __init__(self, position, counters: dict, enabled: bool) -> None:
        self._position = position  # agent.position.Position: which thread trains
        self._counters = counters
        self.enabled = enabled  # the tracker's durations are the thread's CPU time
        self.spans: list[tuple[int, int, int, int, int, int]] = []
        self._open: tuple[int, int, int] | None = None  # (wall, CPU, began by)

    def begin(self, kind: int) -> None:
        """A phase ended: the thread is outside every phase from now (again, if it already was)."""
        if self.enabled and threading.get_ident() == self._position.thread_id:
            self._open = (time.perf_counter_ns(), time.thread_time_ns(), kind)

    def end(self, kind: int) -> None:
        """A phase begins: the stretch outside, if one is open, ends now."""
        o = self._open
        if o is not None and threading.get_ident() == self._position.thread_id:
            self._add(o, time.perf_counter_ns(), time.thread_time_ns(), kind)
            self._open = None

    def cancel(self) -> None:
        """The stretch open now is a phase's after all (the code between two optimizers' steps)."""
        self._open = None

    def take(self, end_ns: int) -> list[tuple[int, int, int, int, int, int]]:
        """The stretches of the step that ends at `end_ns`; one open since before it ends there (a step ended by
        `step()`) and goes on in the next step."""
        o = self._open
        if o is not None and o[0] < end_ns:
            cpu = time.thread_time_ns()
            self._add(o, end_ns, cpu, START)
            self._open = (end_ns, cpu, START)
        spans, self.spans = self.spans, []
        return spans

    def _add(self, o: tuple[int, int, int], wall: int, cpu: int, kind: int) -> None:
        """The open stretch `o`, ended at (wall, cpu) by `kind`."""
        if len(self.spans) >= MAX_SPANS_PER_STEP:
            self._counters["outside_spans_dropped"] = self._counters.get("outside_spans_dropped", 0) + 1
            return
        self.spans.append((o[0], wall, o[1], cpu, o[2], kind))


def host_wait_ns(spans: list, fetches: list, host_ns: int) -> int:
    """The part of the step's host time (`host_ns`) the thread was not running. With DataLoader fetches, host
    time is all of the time outside the phases but the fetches: every stretch's wait less the fetches' (a fetch
    waiting for a worker is data loading). Without, it is the stretches between a forward and its backward and
    between the backward and the optimizer step."""
    if not spans:
        return 0
    if fetches:
        waited = sum((s[1] - s[0]) - (s[3] - s[2]) for s in spans)
        waited -= sum((f[1] - f[0]) - (f[3] - f[2]) for f in fetches)
    else:
        waited = sum((s[1] - s[0]) - (s[3] - s[2]) for s in spans if (s[4], s[5]) in LOOP_CODE)
    return max(0, min(int(waited), host_ns))
