"""A safe exit for jobs that destroy their process group and then drop a DDP model implicitly.

Why a job could hang at exit (torch 2.13, gloo): torch stashes a copy of the contextvars Context in the
autograd thread-local state for every backward pass (`_engine_run_backward`), and each gloo collective
launched during the pass (DDP's gradient all-reduce) copies that state into its work, so the work holds the
Context, whose C++ holder takes the GIL to let it go. A gloo worker thread drops a finished work a moment
after the training thread has been told it is done; now and then (5-20 % of steps, 2 ranks on a busy CPU) that
is after the pass returned, and the worker, now the Context's last holder, waits for the GIL. If in that
moment the process group is freed from Python (`destroy_process_group()`, then main() returns with the DDP
model a local: the reducer frees the group with the GIL held), ~ProcessGroupGloo joins that worker while
holding the GIL, and neither moves again. The tracker's hooks widen the window (why is not known): 4 exits in
12 hung with the tracker alone, no transport; none in 28 without the agent (one of those aborted), none with
only a busy Python thread added.

What this does: the tracker hands over each pass's Context (`note_pass`, at the end of the pass, outside
every timed window); while tracking is on, `torch.distributed.destroy_process_group` first waits, with the
GIL released, until no one but us holds the last PASSES of them: every gloo work of those passes is gone, and
freeing the group later cannot wait on a worker (about 0.3 ms when a worker still held one, nothing
otherwise). The wait is bounded (DRAIN_S) and fail-open; a Context is held at most until PASSES passes later.
Removing the wrapper (closing the tracker) drains too: a job that tracks in a `with` block and frees its group
after it (the seed's way of use) hung in 20 cycles of tests/exit_train.py --tracked before, and no longer does.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections import deque

import torch

logger = logging.getLogger(__name__)

# The key torch stashes the backward's Context under (torch/autograd/graph.py); an older torch stashes none.
CONTEXT_KEY = "context"
_in_tls = getattr(torch._C, "_is_key_in_tls", None)
_from_tls = getattr(torch._C, "_get_obj_in_tls", None)


def _current_context():
    """The Context torch stashed for the backward pass running on this thread, or None."""
    if _in_tls is None or _from_tls is None or not _in_tls(CONTEXT_KEY):
        return None
    return _from_tls(CONTEXT_KEY)


# Contexts of the most recent passes kept (gradient accumulation runs several passes a step). A gloo worker that
# drops a finished work can be off its core for several tiny passes on a loaded host: with 4 kept, a job of 1-2 ms
# passes hung at its exit in 2 of 25 runs beside a CPU burner (the worker held the Context of an older pass).
PASSES = 64
# The longest destroy_process_group() waits for the workers; past it, it goes on (and counts it).
DRAIN_S = 2.0
POLL_S = 0.0002
# sys.getrefcount of an object that only a deque entry (and getrefcount's own argument) refers to.
_OURS = 2


def _modules() -> list:
    """Where users call destroy_process_group from: torch.distributed and its distributed_c10d."""
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available():
        return []
    import torch.distributed.distributed_c10d as c10d

    return [dist, c10d]


class ExitDrain:
    """Remembers the latest passes' Contexts; while installed, destroy_process_group() waits for them."""

    def __init__(self) -> None:
        self._held: deque = deque(maxlen=PASSES)
        self._patched: list[tuple] = []  # (module, the original function, our wrapper)
        self.counters = {"drain_waits": 0, "drain_timeouts": 0}

    def note_pass(self) -> None:
        """At the end of a backward pass, on the thread that ran it: keep its Context (no-op without one)."""
        context = _current_context()
        if context is not None and (not self._held or self._held[-1] is not context):
            self._held.append(context)

    def install(self) -> None:
        if self._patched:
            return
        for module in _modules():
            original = getattr(module, "destroy_process_group", None)
            if original is None or getattr(original, "__modtrack_drain__", False):
                continue
            wrapper = self._wrap(original)
            module.destroy_process_group = wrapper
            self._patched.append((module, original, wrapper))

    def remove(self) -> None:
        """Wait for the kept Contexts (drain: a group freed after this is no longer guarded), then put the
        originals back (where nobody wrapped ours since) and let the Contexts go."""
        try:
            self.drain()
        finally:
            for module, original, wrapper in self._patched:
                if getattr(module, "destroy_process_group", None) is wrapper:
                    module.destroy_process_group = original
            self._patched = []
            self._held.clear()

    def _wrap(self, original):
        @functools.wraps(original)
        def destroy_process_group(*args, **kwargs):
            try:
                self.drain()
            except Exception:
                logger.debug("modtrack: drain before destroy_process_group failed (ignored)", exc_info=True)
            return original(*args, **kwargs)

        destroy_process_group.__modtrack_drain__ = True  # type: ignore[attr-defined]
        return destroy_process_group

    def drain(self, timeout_s: float = DRAIN_S) -> bool:
        """Wait, sleeping (the GIL released), until only we hold the kept Contexts; then let them go.
        True when they were free in time."""
        held = self._held
        if held and held[-1] is _current_context():
            held.pop()  # called inside a backward pass: its own Context is held until the pass ends
        if not _shared(held):
            held.clear()
            return True
        self.counters["drain_waits"] += 1
        deadline = time.monotonic() + timeout_s
        while _shared(held):
            if time.monotonic() > deadline:
                self.counters["drain_timeouts"] += 1
                held.clear()
                return False
            time.sleep(POLL_S)
        held.clear()
        return True


def _shared(held: deque) -> bool:
    """Does anyone but `held` refer to one of its objects? (Indexed, so that no other reference exists.)"""
    return any(sys.getrefcount(held[i]) > _OURS for i in range(len(held)))
