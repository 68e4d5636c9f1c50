"""Where the rank is right now: the innermost open module, the phase, the step.

The tracker's hooks write a few ints into one preallocated object (no allocation per call: the values
are ints the hooks already hold); the heartbeat reads it from the sender thread. Reads race with
writes, which is fine: each field is one reference store, so a reader sees a value that was true a
moment ago, and the next read sees the newer one. Time is not stamped here: the reader notices when
the position last changed (agent/heartbeat.py), so hooks pay for no clock call.

`entered` is the row of the last module call begun (a list the hooks already made): a rank that calls
the same module over and over (a recurrent cell, a generation loop) shows the same module and phase at
every look, but not the same call, so it moves.
"""

from __future__ import annotations

import threading

# Phase codes. FORWARD, BACKWARD and RECOMPUTE are agent.step_record.PHASES' indices.
FORWARD, BACKWARD, RECOMPUTE, OPTIMIZER, DATA, OUTSIDE = range(6)
PHASE_NAMES = ("forward", "backward", "recompute", "optimizer", "data", "outside")
NO_MODULE = -1


class Position:
    """module: innermost open module id (NO_MODULE: none); phase: a code above; step: the step in
    progress; step_start_ns: perf_counter_ns when it began; passes: backward passes begun in it
    (tells "outside, before backward" from "outside, after it"); entered: the last call begun (its row);
    thread_id: the training thread."""

    __slots__ = ("entered", "module", "passes", "phase", "step", "step_start_ns", "thread_id")

    def __init__(self, step_start_ns: int = 0) -> None:
        self.module = NO_MODULE
        self.phase = DATA
        self.step = 0
        self.step_start_ns = step_start_ns
        self.passes = 0
        self.entered: object = None
        self.thread_id = threading.get_ident()  # the training thread: the one that runs the hooks

    def snapshot(self) -> tuple[int, int, int, int, int]:
        """(step, phase, module, passes, the last call begun): what the reader compares between two looks."""
        return self.step, self.phase, self.module, self.passes, id(self.entered)

    def new_step(self, step: int, start_ns: int) -> None:
        """A step ended: the next one begins with its data loading, outside every module."""
        self.module = NO_MODULE
        self.phase = DATA
        self.passes = 0
        self.entered = None
        self.step_start_ns = start_ns
        self.step = step
