"""The detector's input and output types: one merged step of a job, and a straggler episode.

The merge (collector/pipeline/merge.py) builds a StepMatrix per step from the ranks' reports; the
detector (collector/pipeline/detector.py) reads it and keeps Episodes. Columns are (module, phase)
pairs with job-wide ids, so every rank's figures for one module share a column.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    forward_ms: np.ndarray = field(default=None)  # (R,) optional, for the API
    backward_ms: np.ndarray = field(default=None)  # (R,)
    module_names: list[str] = field(default_factory=list)  # job-wide id -> name


@dataclass
class Episode:
    """A rank (or a whole host, rank = -1) found slow in one module and phase."""

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
