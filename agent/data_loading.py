"""Time inside torch DataLoader iterators: which part of a step's time outside its phases is data loading.

A step's time outside forward, backward and the optimizer (StepReport.data_ns) holds the batch's loading and the
training loop's own code besides: the copy to the device, logging, metrics, an EMA update or a learning-rate
scheduler after the optimizer step, `zero_grad`. Told apart by nothing, all of it was "data loading", and a rank
slow in its logging was sent to tune its DataLoader. So `next()` on a torch DataLoader's iterator is timed while
a tracker is open (on the training thread only): in a step that fetched from one, what is outside the phases and
outside its fetches is the loop's own code (StepReport.host_ns). A loop that loads its batches otherwise (its own
iterator) is told as before. With workers, a fetch lasts as long as the training thread waits for the batch.
One wrapper for all trackers, put back when the last one closes (agent/patch.py).
"""

from __future__ import annotations

import functools
import threading
import time

from modtrack.agent.patch import Patch

MAX_FETCHES_PER_STEP = 4096  # a step that fetches more keeps the first ones; the rest are counted


class Fetches:
    """The training thread's DataLoader fetches of the step in progress: (start, end, CPU start, CPU end), wall
    perf_counter_ns and the thread's CPU time (a fetch that waited for a worker: agent/outside_spans.py)."""

    def __init__(self, position, counters: dict) -> None:
        self._position = position  # agent.position.Position: which thread trains
        self._counters = counters
        self.spans: list[tuple[int, int, int, int]] = []

    def add(self, start: int, end: int, cpu_start: int, cpu_end: int) -> None:
        if threading.get_ident() != self._position.thread_id:
            return  # a loader iterated on another thread (a prefetching thread of the user's) waits for no step
        if len(self.spans) >= MAX_FETCHES_PER_STEP:
            self._counters["fetches_dropped"] = self._counters.get("fetches_dropped", 0) + 1
            return
        self.spans.append((start, end, cpu_start, cpu_end))

    def take(self, end_ns: int) -> list[tuple[int, int, int, int]]:
        """The fetches of the step that ends at `end_ns` (for its StepLog.fetches); those begun after it stay,
        the next step's (a step is closed when the next one begins: its batch was fetched in between)."""
        spans = self.spans
        self.spans = [s for s in spans if s[0] >= end_ns]
        return [s for s in spans if s[0] < end_ns] if self.spans else spans


def _wrap(original, listeners: list):
    @functools.wraps(original)
    def __next__(self):
        start, cpu_start = time.perf_counter_ns(), time.thread_time_ns()
        try:
            return original(self)
        finally:
            end, cpu_end = time.perf_counter_ns(), time.thread_time_ns()
            for tracker in tuple(listeners):
                try:
                    tracker.fetches.add(start, end, cpu_start, cpu_end)
                except Exception:
                    tracker.counters["hook_errors"] += 1

    return __next__


def _iterator_class():
    try:
        from torch.utils.data import dataloader

        return dataloader._BaseDataLoaderIter
    except (ImportError, AttributeError):  # a torch without it: loading is told as before
        return None


_patch = Patch(_iterator_class(), "__next__", _wrap)
add, remove = _patch.add, _patch.remove  # trackers: their `fetches` (Fetches) and `counters`
