"""What the collector's stages hand each other, and the wire's constants, in one place.

Ingest turns a report into a StepRow; the merge (collector/pipeline/merge.py) lines a step's rows
up into a StepMatrix; the detector (collector/pipeline/detector.py) reads it and keeps Episodes.
Columns are (module, phase) pairs with job-wide ids, so every rank's figures for one module share
a column; `column_key` packs a pair into one integer. Phases and agent counters come from the
proto, so a new phase or counter there reaches every stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from modtrack.collector.small_arrays import nan_to
from modtrack.protos import modtrack_pb2 as pb

# Phase ids are the proto's Phase enum: 1 forward, 2 backward, 3 recompute (0 is never sent).
Phase = pb.Phase
PHASE_NAMES: dict[int, str] = {
    number: name.removeprefix("PHASE_").lower() for name, number in pb.Phase.items() if number
}
PHASE_IDS: dict[str, int] = {name: number for number, name in PHASE_NAMES.items()}
N_PHASES = max(pb.Phase.values()) + 1  # slots per module in a column key, the unused 0 included
CLOCK_KIND_CPU = pb.CLOCK_KIND_CPU  # a rank timing its modules in host CPU time
CLOCK_KIND_CUDA = pb.CLOCK_KIND_CUDA  # ... with CUDA events (durations hold waits in collectives)

# The agent's own cumulative counters, as the wire names them.
AGENT_COUNTERS: tuple[str, ...] = tuple(f.name for f in pb.AgentCounters.DESCRIPTOR.fields)

# A step's scalar figures, as the wire and the store name them (ns, but gc_collections: a count). New ones go
# last: users unpack them in order.
STEP_FIGURES = (
    "start_ns",
    "end_ns",
    "forward_ns",
    "backward_ns",
    "optimizer_ns",
    "data_ns",
    "backward_tail_ns",
    "recompute_ns",
    "gc_ns",  # full GC pauses on the training thread (wall); module times and data_ns leave them out
    "gc_collections",  # how many
    "host_ns",  # the training loop's own code between the phases, part of data_ns (agents before it: 0)
    "host_wait_ns",  # the part of host_ns the rank was blocked, e.g. in gradient clipping's all-reduce (else 0)
)
# A StepRow's per-module columns (one entry per module and phase) and its trace's columns (one
# entry per call), with the dtype each is kept in.
MODULE_COLUMNS = (
    ("phase", np.uint8),
    ("module", np.uint32),
    ("calls", np.uint32),
    ("inclusive", np.int64),
    ("self", np.int64),
    ("first_start", np.int64),
    ("last_end", np.int64),
)
# Each call's window of the modules called several times in a phase (PhaseStats.call_start_ns), where a rank
# sends them: the entry of the module columns each belongs to, its start and end (agent clock).
CALL_COLUMNS = (
    ("call_owner", np.uint32),
    ("call_start", np.int64),
    ("call_end", np.int64),
)
TRACE_COLUMNS = (
    ("module", np.uint32),
    ("phase", np.uint8),
    ("start", np.int64),
    ("end", np.int64),
    ("depth", np.uint32),
)


# np.iinfo() builds an object per call (~5 µs): the bounds once
INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def column_key(module, phase):
    """One integer per (module, phase) pair, for ints and numpy arrays alike; the inverse is
    `divmod(key, N_PHASES)`."""
    return module * N_PHASES + phase


@dataclass
class StepRow:
    """One rank's report of one step, validated, with module ids already job-wide."""

    job: str
    rank: int
    step: int
    figures: dict  # STEP_FIGURES -> int ns
    modules: dict  # MODULE_COLUMNS names -> np.ndarray
    trace: dict | None = None  # TRACE_COLUMNS names -> np.ndarray, plus "capture_id"
    counters: dict = field(default_factory=dict)  # AGENT_COUNTERS -> int
    attempt: int = 0  # the job's attempt (torchelastic restart count) the rank's stream belongs to
    collectives: list = field(default_factory=list)  # collectives_parse.GroupStep, maybe of earlier steps
    gpu: GpuSample | None = None  # GPU health: the sample this report carried, if any (not stored)
    detail: bool = True  # sampled mode: False when the rank timed no module this step (step figures only)
    # the clock offset its collectives and module windows were lined up with (its host's best, merge.host_offset)
    clock_offset_ns: int = 0
    # (end of its last module forward, start of its first module backward, end of its last; INT64_MIN / INT64_MAX
    # where none), worked out at ingest from the report's lists; None: the merge works them out from the columns
    pass_marks: tuple[int, int, int] | None = None

    def sql_row(self) -> tuple:
        """(job, attempt, rank, step, *STEP_FIGURES, *MODULE_COLUMNS as BLOBs, *CALL_COLUMNS as BLOBs or None,
        clock_offset_ns): the store's steps row."""
        calls = "call_owner" in self.modules
        return (
            self.job,
            self.attempt,
            self.rank,
            self.step,
            *(int(self.figures[f]) for f in STEP_FIGURES),
            *(blob(self.modules[name], dtype) for name, dtype in MODULE_COLUMNS),
            *(blob(self.modules[name], dtype) if calls else None for name, dtype in CALL_COLUMNS),
            int(self.clock_offset_ns),
        )

    def collective_rows(self) -> list[tuple]:
        """The store's collectives rows of the stats this report carried (each about its own step)."""
        return [
            (
                self.job,
                self.attempt,
                self.rank,
                int(s.step),
                s.group,
                int(np.uint64(s.ranks_hash).astype(np.int64)),  # SQLite's INTEGER is signed
                s.backend,
                int(s.group_size),
                int(s.count),
                int(s.total_ns),
                int(s.wait_ns),
                int(np.uint64(s.bytes).astype(np.int64)),
                int(s.active_measured),
                int(s.unlisted),
                int(self.clock_offset_ns),
                blob(s.seq, np.uint64),
                blob(s.issue_ns, np.int64),
                None if s.active_ns is None else blob(s.active_ns, np.int64),
            )
            for s in self.collectives
        ]

    def trace_row(self) -> tuple:
        t = self.trace
        assert t is not None, "a step without a trace has no trace row"
        return (
            self.job,
            self.attempt,
            self.rank,
            self.step,
            t["capture_id"],
            *(blob(t[name], dtype) for name, dtype in TRACE_COLUMNS),
        )


def blob(values: np.ndarray, dtype) -> memoryview:
    """A column as BLOB bytes without an extra copy: SQLite copies the buffer when it binds it."""
    return np.ascontiguousarray(values, dtype).data.cast("B")


@dataclass
class StepMatrix:
    job: str
    step: int
    ranks: np.ndarray  # (R,) int64 rank numbers, ascending
    hosts: list[str]  # (R,) host of each rank
    column_module: np.ndarray  # (K,) int64 job-wide module id of each column
    column_phase: np.ndarray  # (K,) int64 phase id of each column: 1 forward, 2 backward, 3 recompute
    self_ms: np.ndarray  # (R, K) float64 compute (self) time; NaN where the rank did not run it
    wall_ms: np.ndarray  # (R,) step wall time
    sync_wait_ms: np.ndarray  # (R,) backward tail: waiting in the gradient all-reduce
    forward_ms: np.ndarray | None = None  # (R,) optional, for the API
    backward_ms: np.ndarray | None = None  # (R,)
    module_names: Sequence[str] = field(default_factory=list)  # job-wide id -> name
    # Step-level figures outside modules (wall time), judged like module columns when present:
    data_ms: np.ndarray | None = None  # (R,) data loading and everything outside fwd/bwd/optimizer
    optimizer_ms: np.ndarray | None = None  # (R,)
    gc_ms: np.ndarray | None = None  # (R,) full GC pauses on the training thread (out of module and data times)
    # Time in forward and backward not spent computing (wall minus module compute): the waits of
    # every phase (FSDP's forward all-gathers, reduce-scatters, DDP's backward tail). None: the
    # backward tail (sync_wait_ms) is all that is known.
    idle_ms: np.ndarray | None = None  # (R,)
    attempt: int = 0  # the job's attempt (torchelastic restarts) this step belongs to
    # Sampled mode: which ranks carry module detail this step (None: all); whether self times are CPU time
    detail: np.ndarray | None = None  # (R,) bool
    cpu_clock: bool = False
    # (R,) the part of data_ms between the last module forward and the first module backward: the host's own
    # code there (the loss, a user's code in the training loop), not data loading. None: not known.
    host_ms: np.ndarray | None = None
    # (R,) the part of host_ms the rank was blocked (gradient clipping's all-reduce under FSDP, a barrier): a wait,
    # in idle_ms too, and out of the host time judged. None: not known (0 from agents before it, or off the CPU clock)
    host_wait_ms: np.ndarray | None = None

    @property
    def idle_or_tail_ms(self) -> np.ndarray:
        """(R,) float64 what each rank waited, in any phase: idle_ms where known, else the backward tail; NaN as 0.
        The one reading of a step's waits that the detector, the episodes and the evaluator share."""
        return nan_to(self.sync_wait_ms if self.idle_ms is None else self.idle_ms)


def idle_less_gc(in_modules_ms: np.ndarray, gc_ms: np.ndarray | None) -> np.ndarray:
    """What a CPU-clocked rank waited in forward and backward: their wall minus its module compute
    (`in_modules_ms`), less its full GC pauses. Module times leave the pauses out and forward/backward wall keeps
    them: without this a rank pausing in GC would look like one waiting for its peers (a victim), and its peers'
    wait for it would not count. Pauses that fell in the optimizer or data loading come off too (the report does
    not say where each fell): the waits then read low by them, alike on every rank whose pauses are alike."""
    return in_modules_ms if gc_ms is None else in_modules_ms - nan_to(gc_ms)


def entry_without_ratio(module: str, phase: str, entries: list[dict]) -> dict | None:
    """A verdict's listed entry for its own module and phase when that has no slowdown: its peers spend nothing
    there (a rank's garbage collection: their median is 0), so its excess tells it, not a ratio. Else None."""
    top = next((e for e in entries if (e["module"], e["phase"]) == (module, phase)), None)
    return top if top is not None and top.get("slowdown") is None else None


@dataclass
class Episode:
    """A rank (or a whole host, rank = -1) found slow: one verdict listing every place it is slow.

    module/phase name the costliest entry when the episode opened (they identify its alert);
    `modules` lists every significant module x phase (and step-level cause) by excess, now.
    """

    job: str
    rank: int  # -1 for a host-level (node suspect) episode
    host: str
    module: str
    phase: str  # "forward" | "backward" | "recompute"
    slowdown: float  # this rank's time over its peers' median, recent steps
    first_step: int
    last_step: int  # last step flagged
    state: str  # "active" | "resolved"
    cost_ms_per_step: float  # step time lost vs. the culprit at its peers' median
    cost_pct: float = 0.0
    ranks: list[int] = field(default_factory=list)  # for host episodes: the ranks involved
    id: int | None = None  # set by the store
    cause: str = ""  # what to look at: "compute in 4 modules", "data loading", "whole rank", ...
    excess_ms: float = 0.0  # the culprit's own excess time per slow step, over its peers' median
    modules: list[dict] = field(default_factory=list)  # [{module, phase, excess_ms, slowdown}], costliest first
    attempt: int = 0  # torchelastic restart count of the job when the episode opened
    explanation: str = ""  # GPU health: what the culprit's GPU says, e.g. "SM clock 1.1 GHz vs peers' 1.98 GHz: ..."


# GPU health: the numeric figures of a GpuHealth sample, in the order a GpuSample holds them (NaN: not given).
GPU_FIGURES = (
    "sm_clock_mhz",
    "max_sm_clock_mhz",
    "memory_clock_mhz",
    "temperature_c",
    "power_mw",
    "power_limit_mw",
    "utilization_pct",
    "ecc_uncorrected",
    "xid_events",
    "last_xid",
    "errors",
)


@dataclass
class GpuSample:
    """A rank's GpuHealth, validated at the edge (collector/ingest/gpu_edge.py)."""

    figures: np.ndarray  # (len(GPU_FIGURES),) float64, NaN where the agent sent nothing
    clock_event_reasons: int  # GpuClockReason bits; 0 when none or not given
    nvml_index: int = 0
    name: str = ""
    unavailable: str = ""  # why the rank has no figures ("" when it has)
