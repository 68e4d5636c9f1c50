"""The scenario benchmark's truth (tests/bench/scenarios.py measured_loss) on step times with a known loss.

A 1-in-3 straggler costs every step of the job 40 ms, on a host whose pace drifts (+0.5 ms per step) with a
preemption spike now and then; on rank 0 a slow step's boundary comes early (15 of its 40 ms show in the step
before), as on shared cores (kept DDP jobs: 83-86 ms against its peers' 93-104, its sums over three steps the
same). The job lost 40 / 3 ms per step over its slow and fast steps. Rank 0's clock alone with a window's mean
against its unslowed steps said 6.1 +- 3.1; rank 0's clock alone, paired, 6.3.

A persistent fault that stops (--stop-at) on a host that speeds up over the run (-0.8 ms per step, as when other
runs end): its loss bracketed between a window before the onset and one after the stop; against the window
before alone the drift takes 20 ms off its 30 (it says 10).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
import scenarios

ONSET, STEPS, EVERY, SLOW_MS = 15, 70, 3, 40.0


def step_ms(rank: int, step: int, rng) -> float:
    ms = 50.0 + 0.5 * step + rng.normal(0, 2.0) + (30.0 if rng.random() < 0.05 else 0.0)
    slow = step >= ONSET and (step - ONSET) % EVERY == 0
    early = step + 1 >= ONSET and (step + 1 - ONSET) % EVERY == 0  # rank 0's step before a slow one
    if slow:
        ms += SLOW_MS - (15.0 if rank == 0 else 0.0)
    elif early and rank == 0:
        ms += 15.0
    return ms


def test_an_intermittent_faults_truth_is_its_loss_per_step(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "times.jsonl"
    with open(path, "w") as f:
        for step in range(STEPS):
            for rank in range(3):
                f.write(json.dumps({"attempt": 0, "step": step, "rank": rank, "ms": step_ms(rank, step, rng)}) + "\n")
    loss, se = scenarios.measured_loss(str(path), 0, ONSET, STEPS, EVERY, se=True)
    assert loss == pytest.approx(SLOW_MS / EVERY, rel=0.1)
    assert 0 < se < 0.1 * loss


def test_a_stopped_faults_bracketed_truth_is_its_loss_on_a_drifting_host(tmp_path):
    rng = np.random.default_rng(5)
    stop, steps, slow_ms = 50, 80, 30.0
    path = tmp_path / "times.jsonl"
    with open(path, "w") as f:
        for step in range(steps):
            for rank in range(3):
                ms = 120.0 - 0.8 * step + rng.normal(0, 3.0) + (slow_ms if ONSET <= step < stop else 0.0)
                f.write(json.dumps({"attempt": 0, "step": step, "rank": rank, "ms": ms}) + "\n")
    loss, se = scenarios.bracketed_loss(str(path), 0, ONSET, stop)
    assert loss == pytest.approx(slow_ms, rel=0.1)
    assert 0 < se < 0.1 * loss
    before_only = scenarios.measured_loss(str(path), 0, ONSET, stop)
    assert before_only < 0.5 * slow_ms  # what the window before alone says
