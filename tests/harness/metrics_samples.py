"""A step matrix and an episode as the detector hands them to /metrics (metrics and deploy tests)."""

from __future__ import annotations

import numpy as np

from modtrack.collector.records import Episode, StepMatrix


def matrix(job="train", step=7, n_ranks=4, n_modules=3, hosts=None):
    hosts = hosts or [f"node{r // 2}" for r in range(n_ranks)]
    return StepMatrix(
        job=job,
        step=step,
        ranks=np.arange(n_ranks),
        hosts=hosts,
        column_module=np.arange(n_modules),
        column_phase=np.ones(n_modules, dtype=np.int64),
        self_ms=np.ones((n_ranks, n_modules)),
        wall_ms=100.0 + np.arange(n_ranks) * 10,
        sync_wait_ms=np.full(n_ranks, 20.0),
    )


def episode(rank=1, host="node0", module="Net.blocks.1.mlp", phase="backward", state="active", cost=12.0, **kw):
    return Episode(
        job="train",
        rank=rank,
        host=host,
        module=module,
        phase=phase,
        slowdown=2.5,
        first_step=3,
        last_step=9,
        state=state,
        cost_ms_per_step=cost,
        **kw,
    )
