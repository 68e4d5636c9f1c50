"""StepRow: one rank's stored step, built from a few self times (the merge and store tests share it)."""

from __future__ import annotations

import numpy as np

from modtrack.collector.records import StepRow


def row(job, rank, step, modules, phases, self_ms, wall_ms=10.0, tail_ms=1.0) -> StepRow:
    n = len(modules)
    figures = {"start_ns": 0, "end_ns": int(wall_ms * 1e6), "forward_ns": 2_000_000,
               "backward_ns": 3_000_000, "optimizer_ns": 0, "data_ns": 0,
               "backward_tail_ns": int(tail_ms * 1e6), "recompute_ns": 0, "gc_ns": 0, "gc_collections": 0,
               "host_ns": 0, "host_wait_ns": 0}  # fmt: skip
    ns = (np.array(self_ms) * 1e6).astype(np.int64)
    return StepRow(job, rank, step, figures, {
        "phase": np.array(phases, np.uint8), "module": np.array(modules, np.int64),
        "calls": np.ones(n, np.uint32), "inclusive": ns, "self": ns,
        "first_start": np.zeros(n, np.int64), "last_end": ns})  # fmt: skip
