"""One training step of one rank, columnar: what the tracker hands to the transport.

Kept free of protobuf messages so the training thread never builds one; the transport thread
turns a StepRecord into a StepReport (agent/report_codec.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from modtrack.protos.phases import MODULE_PHASES

PHASES = MODULE_PHASES  # forward, backward, recompute: a phase's index + 1 is its wire enum number


@dataclass
class PhaseColumns:
    """Per-module figures of one phase: entry i of every array is about module_id[i]."""

    module_id: np.ndarray  # uint32
    calls: np.ndarray  # uint32
    inclusive_ns: np.ndarray  # int64
    self_ns: np.ndarray  # int64, inclusive minus children
    first_start_ns: np.ndarray  # int64, tracker clock
    last_end_ns: np.ndarray  # int64, tracker clock
    # each call's window of the modules called more than once (entry order, then call order); empty unless the
    # step's log asked for them (StepLog.call_windows)
    call_start_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    call_end_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class TraceColumns:
    """Every module call of a captured step, in start order."""

    module_id: np.ndarray  # uint32
    phase: np.ndarray  # uint8 index into PHASES
    start_ns: np.ndarray  # int64
    end_ns: np.ndarray  # int64
    depth: np.ndarray  # uint32
    capture_id: str = ""


@dataclass
class StepRecord:
    step: int
    start_ns: int  # end of the previous step (or tracking start), tracker clock
    end_ns: int  # this step's boundary
    forward_ns: int = 0
    backward_ns: int = 0
    optimizer_ns: int = 0
    data_ns: int = 0  # wall time outside forward, backward, recompute and optimizer
    backward_tail_ns: int = 0  # last module backward end -> backward pass end
    overlapping_calls: int = 0  # calls whose children add up to more than the call (never sent: a tracker counter)
    recompute_ns: int = 0
    gc_ns: int = 0  # wall time of the step's full garbage collections on the training thread (agent/gc_pauses.py)
    gc_collections: int = 0
    host_ns: int = 0  # the loop's own code between the phases (part of data_ns): StepReport.host_ns
    host_wait_ns: int = 0  # the part of host_ns the training thread was not running: StepReport.host_wait_ns
    first_new_module_id: int = 0
    new_module_names: list[str] = field(default_factory=list)
    phases: dict[str, PhaseColumns] = field(default_factory=dict)
    trace: TraceColumns | None = None
    detail: bool = True  # sampled mode: False when this step carries no module detail (phases is empty)
    collectives: list = field(default_factory=list)  # agent.collectives.GroupStats, maybe of earlier steps

    @property
    def wall_ns(self) -> int:
        return self.end_ns - self.start_ns
