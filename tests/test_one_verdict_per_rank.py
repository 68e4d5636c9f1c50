"""A rank holds one verdict at a time, on a real job's own figures.

tests/data/ddp_ramp_first.npz holds every step of a 3-rank DDP torchrun job (examples/train.py under the agent, CPU
ranks on a loaded 2-core host) whose rank 0 spent 0 -> 40 ms more in blocks.2.mlp's backward over 15 steps from step
15 (tests/bench/scenarios.py `ramp`, kept with --keep, saved by tests/harness/replay.py). The ramp's first slow steps
list the module with a cost still under the floor, so the episode waits to be told; a collector that let the next
step's evidence open a second episode in its place reported both (2026-12-06, as the job ran), the first one never
to resolve. The truth: the ranks' own step times (examples/train.py --step-times), 37.7 +- 1.2 ms per step lost.
"""

from __future__ import annotations

import os

from harness import replay

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ddp_ramp_first.npz")
CULPRIT, ONSET, LOST_MS = 0, 15, 37.7


def test_a_ramp_waiting_for_its_cost_is_one_verdict():
    episodes = replay.judge(replay.load(FIXTURE))
    assert [(e.rank, e.state) for e in episodes] == [(CULPRIT, "active")], [
        (e.rank, e.cause, e.first_step, e.last_step, e.state) for e in episodes
    ]
    (ep,) = episodes
    assert [(e["module"], e["phase"]) for e in ep.modules] == [("TinyGPT.blocks.2.mlp", "backward")]
    assert ONSET <= ep.first_step <= ONSET + 5
    assert abs(ep.cost_ms_per_step - LOST_MS) <= 0.15 * LOST_MS, ep.cost_ms_per_step
