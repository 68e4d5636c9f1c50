"""Data loading and optimizer are wall time: a rank's figure there is a straggler only when its peers waited for it.

On shared cores a preempted rank shows ms more wall time in its data loading or optimizer now and then, for
steps on end, while its peers were held up just as long: nobody waited for it, the job lost nothing by it.
A slow loader or optimizer keeps every peer waiting in the next collective. Steps built like a synchronous job's.
"""

from __future__ import annotations

import numpy as np
import pytest

from modtrack.collector.pipeline.detector import Detector, DetectorParams
from modtrack.collector.records import StepMatrix

RANKS, MODULES = 3, 8
CPU = DetectorParams(min_excess_ms=1.0, min_excess_frac=0.01)


def step_matrix(step, rng, data_extra=0.0, optimizer_extra=0.0, waited=True, module_extra=0.0):
    """Rank 1 carries the extras. waited: its peers idle until it is done (a synchronous collective);
    otherwise every rank's wall stretches alike (its peers were held up too) and nobody idles for it."""
    x = 5.0 + rng.normal(0, 0.05, (RANKS, MODULES))
    x[1, 2] += module_extra
    d = 2.0 + rng.normal(0, 0.05, RANKS)
    o = 3.0 + rng.normal(0, 0.05, RANKS)
    d[1] += data_extra
    o[1] += optimizer_extra
    busy = x.sum(axis=1) + d + o
    if waited:
        wall = np.full(RANKS, busy.max() + 1.0)
        idle = wall - busy
    else:
        idle = np.full(RANKS, 1.0)
        wall = busy + idle
    return StepMatrix(
        job="j",
        step=step,
        ranks=np.arange(RANKS),
        hosts=["h0"] * RANKS,
        column_module=np.arange(MODULES),
        column_phase=np.full(MODULES, 2),
        self_ms=x,
        wall_ms=wall,
        sync_wait_ms=idle,
        module_names=[f"Net.m{k}" for k in range(MODULES)],
        data_ms=d,
        optimizer_ms=o,
        idle_ms=idle,
    )


def episodes(make, steps=40):
    det, rng, seen = Detector("j", CPU), np.random.default_rng(0), {}
    for s in range(steps):
        for ep in det.observe(make(s, rng)):
            seen[id(ep)] = ep
    return list(seen.values())


def test_a_slow_loader_that_peers_wait_for_is_named():
    found = episodes(lambda s, rng: step_matrix(s, rng, data_extra=20.0 if s >= 10 else 0.0))
    assert [(ep.rank, ep.cause) for ep in found] == [(1, "data loading")]
    assert 10 <= found[0].first_step <= 14


@pytest.mark.parametrize("extra", ["data_extra", "optimizer_extra"])
def test_data_and_optimizer_wall_time_nobody_waited_for_opens_nothing(extra):
    assert episodes(lambda s, rng: step_matrix(s, rng, waited=False, **{extra: 20.0 if s >= 10 else 0.0})) == []


def test_an_optimizer_spike_on_a_rank_slow_in_a_module_is_no_second_cause():
    # The peers wait for the rank's slow module; its optimizer spike adds nothing they wait for beyond it.
    def make(s, rng):
        m = step_matrix(s, rng, module_extra=30.0 if s >= 10 else 0.0)
        if s >= 10 and s % 2:
            m.optimizer_ms[1] += 15.0  # recorded wall time, not waited for: the step's idle is unchanged
        return m

    (ep,) = episodes(make)
    assert ep.rank == 1 and ep.cause == "compute in 1 module"
    assert [e["phase"] for e in ep.modules] == ["backward"]
