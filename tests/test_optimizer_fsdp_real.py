"""A slow optimizer under FSDP on real jobs' own figures: found within 5 steps, one verdict, its cost.

tests/data/fsdp{2,1}_optimizer_last.npz hold every step of a 3-rank torchrun job (examples/train.py --wrap fsdp2 or
fsdp1 under the agent, CPU ranks on a loaded 2-core host: steps of 120-250 ms) whose rank 2 spent 30 ms more in
its optimizer step from step 15 (tests/bench/scenarios.py `optimizer`, kept with --keep, saved by
tests/harness/replay.py). Under FSDP the optimizer is local: the peers wait in the next forward's all-gathers.
Judged as they ran, the FSDP2 job got no verdict (its 31-42 ms of excess were under the bar of 20 % of the step,
and among 3 ranks one peer's noisy optimizer broke every episode's hold), the FSDP1 one was found 26 steps late
with a cost of 0 (its baseline had taken in the slow steps). fsdp2_optimizer_last_wide.npz: the same fault in a 4x
wider model (tests/bench/scenarios.py --model wide: steps of ~350 ms), where its 30-35 ms of excess never cleared
the old bar of 10 % of the step: no verdict at all. fsdp2_optimizer_last_wide_80.npz: that job again, 80 steps (steps
of 400-560 ms): the peers' own optimizer steps ran 12-61 ms for the same work, so the culprit's 45-75 ms cleared the
bars in about half its steps, and the verdict read "intermittent (1 step in 2)": the steps between fed the baseline,
and the cost fell to 7.5 ms where the job lost 37.8 +- 8.6.
"""

from __future__ import annotations

import os

import pytest

from harness import replay

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CULPRIT, ONSET = 2, 15


@pytest.mark.parametrize("name", ["fsdp2", "fsdp1", "fsdp2_wide"])
def test_a_slow_optimizer_under_fsdp_is_one_verdict_found_within_5_steps(name):
    wrap, _, model = name.partition("_")
    matrices = replay.load(os.path.join(DATA, f"{wrap}_optimizer_last{'_' + model if model else ''}.npz"))
    assert [m.step for m in matrices] == list(range(45))
    assert all(m.optimizer_ms[CULPRIT] - max(m.optimizer_ms[:CULPRIT]) > 5.0 for m in matrices[ONSET:][:3])
    episodes = replay.judge(matrices)
    assert [(e.rank, e.state, e.cause) for e in episodes] == [(CULPRIT, "active", "optimizer")], [
        (e.rank, e.cause, e.first_step, e.last_step, e.state) for e in episodes
    ]
    (ep,) = episodes
    assert [(e["module"], e["phase"]) for e in ep.modules] == [("(optimizer)", "optimizer")]
    assert 25.0 < ep.modules[0]["excess_ms"] < 45.0  # 30 ms of CPU time injected, wall time on a loaded host
    assert ONSET <= ep.first_step <= ONSET + 5


def test_the_fsdp1_jobs_cost_is_what_it_lost():
    """Rank 0's own step times (examples/train.py --step-times): 46.6 ms per step more after the onset."""
    (ep,) = replay.judge(replay.load(os.path.join(DATA, "fsdp1_optimizer_last.npz")))
    assert abs(ep.cost_ms_per_step - 46.6) <= 0.15 * 46.6, ep.cost_ms_per_step


def test_the_wide_fsdp2_jobs_cost_is_what_it_lost():
    """The median over the ranks of their own step times: 47.9 +- 10.3 ms per step more after the onset."""
    (ep,) = replay.judge(replay.load(os.path.join(DATA, "fsdp2_optimizer_last_wide.npz")))
    assert abs(ep.cost_ms_per_step - 47.9) <= 0.25 * 47.9, ep.cost_ms_per_step


def test_a_slow_optimizer_that_clears_the_bars_in_half_its_steps_is_persistent_and_costs_what_it_lost():
    """Between the steps it is flagged in, the culprit still carries most of its excess: no intermittent straggler,
    whose other steps run at its peers' pace. The median over the ranks of their own step times: +37.8 +- 8.6 ms."""
    (ep,) = replay.judge(replay.load(os.path.join(DATA, "fsdp2_optimizer_last_wide_80.npz")))
    assert (ep.rank, ep.cause, ep.state) == (CULPRIT, "optimizer", "active")
    assert abs(ep.cost_ms_per_step - 37.8) <= 0.25 * 37.8, ep.cost_ms_per_step
    assert ep.first_step <= ONSET + 20  # found at step 32: with 3 ranks the peers' median is the slower peer
