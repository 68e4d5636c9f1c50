"""A job that evaluates every 10 steps: its straggler's cost is what the job lost at its training pace.

tests/data/{ddp,fsdp2}_eval_last.npz hold every step of a 3-rank torchrun job (examples/train.py --eval-every 10 under
the agent, CPU ranks on a loaded 2-core host) whose rank 2 spent 30 ms more in blocks.1.mlp's forward from step 15
(tests/bench/scenarios.py `eval`, kept with --keep, saved by tests/harness/replay.py). After steps 9, 19, 29 and 39
every rank ran 40 forwards without gradients (an evaluation, as a trainer's eval_steps do); the agent counts them in
the next step, whose step time is then 6-10x the job's pace on every rank, with nobody waiting for anybody. The
collector before took the first one into the job's pace before the onset, and the later ones into the growth the
cost is scaled by: costs of 64.3 (DDP) and 0.0 (FSDP2) ms per step where the jobs lost 22.6 and 33.6.

tests/data/ddp_eval_middle.npz is the same job with rank 1 slow (2026-12-06): the evaluation steps after its onset
took 194-214 ms against the job's recent pace of 54 ms, 29 of which were the culprit's, and cleared the pause bar
(3x that pace plus 3x what the culprit explains) by the culprit's cost counted twice: they scaled the cost to 38.6
where the job lost 27.4.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from harness import replay

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ONSET = 15
# The job's own loss per step (examples/train.py --step-times: each rank's loop clock, evaluation left out; the median
# over the ranks of a step, the last 30 steps' mean minus steps 5-14's): independent of the agent and the collector.
# name: (culprit rank, loss, its SE)
MEASURED = {"ddp_eval_last": (2, 22.6, 3.3), "fsdp2_eval_last": (2, 33.6, 6.1), "ddp_eval_middle": (1, 27.4, 2.4)}


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_a_straggler_in_a_job_that_evaluates_costs_what_the_job_lost(name):
    culprit, loss, se = MEASURED[name]
    matrices = replay.load(os.path.join(DATA, f"{name}.npz"))
    walls = np.array([np.median(m.wall_ms) for m in matrices])
    pace = np.median(walls)
    long_steps = [m.step for m in matrices if np.median(m.wall_ms) > 3 * pace]
    assert long_steps == [0, 10, 20, 30, 40]  # the first step's lazy set-up, then the evaluations
    (ep,) = replay.judge(matrices)
    assert (ep.rank, ep.cause) == (culprit, "compute in 1 module")
    assert [(e["module"], e["phase"]) for e in ep.modules] == [("TinyGPT.blocks.1.mlp", "forward")]
    assert ONSET <= ep.first_step <= ONSET + 5
    assert abs(ep.cost_ms_per_step - loss) <= 0.15 * loss, (ep.cost_ms_per_step, loss, se)
