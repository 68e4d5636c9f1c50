"""The detector on synthetic rank x module matrices: who is slow, where, and never a victim."""

from __future__ import annotations

import time

import numpy as np
import pytest

from modtrack.collector.pipeline.detector import Detector, DetectorParams, column_stats
from modtrack.collector.records import StepMatrix
from modtrack.collector.sim.cluster_model import ClusterModel, Straggler


def run(model: ClusterModel, steps: range, det: Detector | None = None, present=None):
    """Feed steps to a detector; return it and every episode ever reported, by identity."""
    det = det or Detector("sim", DetectorParams())
    seen: dict[int, object] = {}
    for s in steps:
        for ep in det.observe(model.step(s, present(s) if present else None)):
            seen[id(ep)] = ep
    return det, list(seen.values())


def matrix(self_ms, step=0, wait=None, hosts=None, ranks=None) -> StepMatrix:
    x = np.asarray(self_ms, dtype=np.float64)
    R, K = x.shape
    return StepMatrix(
        job="j",
        step=step,
        ranks=np.asarray(ranks if ranks is not None else range(R), np.int64),
        hosts=hosts or ["h0"] * R,
        column_module=np.arange(K, dtype=np.int64),
        column_phase=np.ones(K, np.int64),
        self_ms=x,
        wall_ms=np.full(R, np.nansum(x, axis=1).max()),
        sync_wait_ms=np.zeros(R) if wait is None else np.asarray(wait, np.float64),
        module_names=[f"m{k}" for k in range(K)],
    )


def test_column_stats_ignore_nan_and_even_counts():
    x = np.array([[1.0, np.nan], [2.0, 4.0], [3.0, 8.0], [10.0, np.nan]])
    count, median, mad = column_stats(x)
    assert count.tolist() == [4, 2]
    assert median.tolist() == [2.5, 6.0]
    assert mad.tolist() == [1.0, 2.0]  # |dev| = [1.5, .5, .5, 7.5] -> 1.0; [2, 2] -> 2


def test_heavy_tailed_noise_raises_nothing_over_1000_clean_steps():
    model = ClusterModel(ranks=32, modules=40, sigma=0.05, spike_p=0.001, rank_spike_p=0.001, seed=1)
    _, episodes = run(model, range(1000))
    assert episodes == []


def test_one_slow_rank_in_one_module_found_within_5_steps_at_1_3x():
    model = ClusterModel(ranks=16, modules=30, seed=2)
    model.stragglers = [Straggler([5], module=7, phase=2, slowdown=1.3, onset=50, end=10**9)]
    det, episodes = run(model, range(60))
    assert len(episodes) == 1
    ep = episodes[0]
    assert (ep.rank, ep.host, ep.module, ep.phase, ep.state) == (5, "node0", "Net.layers.7", "backward", "active")
    assert 50 <= ep.first_step <= 54
    assert ep.slowdown == pytest.approx(1.3, abs=0.05)
    assert det.active() == [ep]


def test_ddp_culprit_is_named_never_its_victims():
    model = ClusterModel(ranks=8, modules=10, seed=3)
    model.stragglers = [Straggler([2], module=0, phase=1, slowdown=2.0, onset=10, end=10**9)]
    m = model.step(20)
    assert m.sync_wait_ms[2] == 0 and (np.delete(m.sync_wait_ms, 2) > 0).all()  # victims wait
    _, episodes = run(model, range(40))
    assert [(e.rank, e.module, e.phase) for e in episodes] == [(2, "Net.layers.0", "forward")]
    # Cost: at most its excess (about 1 x the module's base time); less where the next slowest
    # rank, by jitter, would have finished late anyway.
    excess, ep = model.base[model.column(0, 1)], episodes[0]
    assert 0.3 * excess < ep.cost_ms_per_step <= 1.1 * excess
    assert ep.cost_pct == pytest.approx(100 * ep.cost_ms_per_step / m.wall_ms[0], rel=0.1)


def test_cost_is_what_the_step_would_save_with_the_culprit_at_median():
    def step(s, other_slow_ms):
        x = np.full((5, 3), 10.0)
        x[1, 0] = 16.0  # culprit: 6 ms excess in m0
        x[3, 2] += other_slow_ms  # rank 3 a bit slower in m2 (not a straggler)
        compute = x.sum(axis=1)
        return matrix(x, step=s, wait=compute.max() - compute)

    for other, cost in ((0.0, 6.0), (2.0, 4.0)):  # the step can only shrink to rank 3's finish
        det = Detector("j")
        for s in range(6):
            det.observe(step(s, other))
        (ep,) = det.active()
        assert (ep.rank, ep.module) == (1, "m0")
        assert ep.cost_ms_per_step == pytest.approx(cost)


def test_victims_waiting_inside_a_module_are_not_blamed():
    # FSDP-like: 7 victims wait inside m1 (an all-gather), the culprit is slow in m0.
    det = Detector("j")
    rng = np.random.default_rng(0)
    out = []
    for s in range(20):
        x = np.full((8, 3), 10.0) * rng.lognormal(0, 0.02, (8, 3))
        x[3, 0] *= 1.5
        x[np.arange(8) != 3, 1] += 5.0
        out += det.observe(matrix(x, step=s))
    assert {(e.rank, e.module) for e in out} == {(3, "m0")}


def test_a_rank_that_waits_more_than_the_others_is_never_flagged():
    det = Detector("j")
    for s in range(20):
        x = np.full((6, 2), 10.0)
        x[4, 0] = 20.0
        wait = np.zeros(6)
        wait[4] = 30.0  # it waited for someone else: its slowness is not compute
        assert det.observe(matrix(x, step=s, wait=wait)) == []


def test_two_ranks_name_the_slow_one_and_only_it():
    model = ClusterModel(ranks=2, modules=10, seed=4)
    model.stragglers = [Straggler([1], module=3, phase=1, slowdown=1.4, onset=100, end=10**9)]
    det, episodes = run(model, range(110))
    assert [(e.rank, e.module, e.phase) for e in episodes] == [(1, "Net.layers.3", "forward")]
    assert episodes[0].first_step <= 104
    assert episodes[0].slowdown == pytest.approx(1.4, abs=0.06)  # over the other rank, not the mean


def test_two_ranks_clean_noise_and_the_waiting_rank():
    model = ClusterModel(ranks=2, modules=20, sigma=0.05, spike_p=0.002, seed=5)
    assert run(model, range(1000))[1] == []
    det = Detector("j")
    for s in range(20):  # rank 0 looks slower in m0 but it waits more: it is not the culprit
        assert det.observe(matrix([[13.0, 5.0], [10.0, 5.0]], step=s, wait=[9.0, 0.0])) == []


def test_a_rank_leaving_mid_run_breaks_nothing_and_its_episode_closes():
    model = ClusterModel(ranks=8, modules=10, seed=6)
    model.stragglers = [
        Straggler([6], module=2, phase=2, slowdown=1.5, onset=0, end=10**9),
        Straggler([1], module=4, phase=1, slowdown=1.5, onset=0, end=10**9),
    ]
    everyone, without_6 = np.arange(8), np.array([0, 1, 2, 3, 4, 5, 7])
    det, episodes = run(model, range(60), present=lambda s: everyone if s < 30 else without_6)
    by_rank = {e.rank: e for e in episodes}
    assert set(by_rank) == {1, 6}
    assert by_rank[6].state == "resolved" and by_rank[6].last_step == 29
    assert by_rank[1].state == "active" and by_rank[1].last_step == 59
    assert det.active() == [by_rank[1]]


def test_pipeline_stages_with_disjoint_modules():
    model = ClusterModel(ranks=12, modules=24, stages=3, sigma=0.04, seed=7)
    m = model.step(0)
    assert np.isnan(m.self_ms).sum() == 12 * 48 * 2 // 3  # each rank runs a third of the columns
    assert run(model, range(300))[1] == []
    model.stragglers = [Straggler([9], module=20, phase=2, slowdown=1.3, onset=300, end=10**9)]
    _, episodes = run(model, range(300, 320), det=Detector("sim"))
    assert [(e.rank, e.module, e.phase) for e in episodes] == [(9, "Net.layers.20", "backward")]


def test_all_equal_columns_divide_by_nothing_and_flag_nothing():
    det = Detector("j")
    with np.errstate(all="raise"):
        for s in range(10):
            for x in (np.full((5, 4), 3.0), np.zeros((5, 4)), np.full((2, 4), 3.0), np.full((1, 4), 3.0)):
                assert det.observe(matrix(x, step=10 * s + len(x))) == []


def test_episode_closes_after_n_clean_steps():
    model = ClusterModel(ranks=8, modules=10, seed=8)
    model.stragglers = [Straggler([3], module=1, phase=1, slowdown=1.5, onset=10, end=30)]
    det, episodes = run(model, range(29))
    (ep,) = episodes
    assert ep.state == "active"
    run(model, range(29, 34), det=det)
    assert ep.state == "active"  # 4 clean steps: 30..33
    changed = det.observe(model.step(34))  # the 5th
    assert changed == [ep] and ep.state == "resolved" and ep.last_step == 29
    assert det.active() == []
    assert det.observe(model.step(34)) == []  # a replayed step changes nothing


def test_a_slow_host_is_one_host_episode():
    model = ClusterModel(ranks=16, ranks_per_host=4, modules=10, seed=9)
    slow = model.host_ranks("node2")
    model.stragglers = [Straggler(slow, module=5, phase=2, slowdown=1.4, onset=5, end=10**9, host="node2")]
    _, episodes = run(model, range(20))
    assert len(episodes) == 1
    ep = episodes[0]
    assert (ep.rank, ep.host, ep.ranks, ep.module, ep.phase) == (-1, "node2", slow, "Net.layers.5", "backward")
    assert ep.slowdown == pytest.approx(1.4, abs=0.06)


def test_half_a_host_is_reported_rank_by_rank():
    model = ClusterModel(ranks=16, ranks_per_host=4, modules=10, seed=10)
    model.stragglers = [Straggler([8, 9], module=5, phase=2, slowdown=1.4, onset=5, end=10**9)]
    _, episodes = run(model, range(20))
    assert sorted(e.rank for e in episodes) == [8, 9]


def test_restore_continues_the_same_episode_after_a_restart():
    model = ClusterModel(ranks=8, modules=10, seed=11)
    model.stragglers = [Straggler([4], module=6, phase=1, slowdown=1.5, onset=0, end=40)]
    first, (ep,) = run(model, range(20))
    ep.id = 17  # as the store would have set it
    second = Detector("sim")
    second.restore(first.active())
    assert second.active() == [ep]
    _, after = run(model, range(20, 60), det=second)
    assert after == [ep]  # updated and closed, never duplicated
    assert ep.id == 17 and ep.state == "resolved" and ep.last_step == 39 and ep.first_step <= 4


def test_a_1024_by_1000_step_is_detected_well_under_a_second():
    model = ClusterModel(ranks=1024, modules=500, seed=12)
    m = model.step(0)
    det = Detector("sim")
    det.observe(m)
    t0 = time.perf_counter()
    for s in range(1, 4):
        m.step = s
        det.observe(m)
    per_step = (time.perf_counter() - t0) / 3
    assert per_step < 0.5, per_step  # about 0.05 s on one core; generous for a shared machine


def test_on_a_one_host_job_the_culprit_is_a_rank_not_the_host():
    """Every rank on one machine (the demo's case): other ranks' blips elsewhere never make it a host."""
    det = Detector("j", DetectorParams())
    rng = np.random.default_rng(3)
    seen = {}
    for s in range(40):
        x = 10 + rng.normal(0, 0.05, size=(4, 6))
        x[2, 1] *= 3.0  # rank 2 slow in m1
        if s % 2:  # ranks 0 and 3 slow in other columns every other step: noise, not a node
            x[0, 3] *= 3.0
            x[3, 4] *= 3.0
        for ep in det.observe(matrix(x, step=s)):
            seen[id(ep)] = ep
    assert all(ep.rank != -1 for ep in seen.values())
    assert any((ep.rank, ep.module) == (2, "m1") for ep in det.active())


def test_ranks_of_one_host_slow_in_different_columns_are_not_a_node():
    hosts = ["a", "a", "a", "b", "b", "b"]
    det = Detector("j", DetectorParams())
    rng = np.random.default_rng(4)
    for s in range(30):
        x = 10 + rng.normal(0, 0.05, size=(6, 6))
        x[0, 1] *= 2.0
        x[1, 2] *= 2.0
        det.observe(matrix(x, step=s, hosts=hosts))
    assert sorted((ep.rank, ep.module) for ep in det.active()) == [(0, "m1"), (1, "m2")]


def test_an_excess_below_the_floor_never_opens_an_episode():
    """Rank 2 is 1.5x in a 0.2 ms module, rank 3 is 1.5x in a 4 ms module, step after step."""
    x = np.array([[0.2, 4.0, 20.0]] * 5)
    x[2, 0] *= 1.5
    x[3, 1] *= 1.5

    def culprits(params):
        det, seen = Detector("j", params), {}
        for s in range(6):
            for ep in det.observe(matrix(x, step=s)):
                seen[id(ep)] = ep
        return sorted((ep.rank, ep.module) for ep in seen.values())

    assert culprits(DetectorParams()) == [(2, "m0"), (3, "m1")]
    assert culprits(DetectorParams(min_excess_ms=0.5)) == [(3, "m1")]  # 0.1 ms: not worth an alert
    assert culprits(DetectorParams(min_excess_frac=0.005)) == [(3, "m1")]  # 0.005 x a 26 ms step
    assert culprits(DetectorParams(min_excess_ms=3.0)) == []


def test_whole_rank_spikes_do_not_count_as_evidence_for_one_cell():
    """One spike of a cell and two of its whole rank are not a cell slow in 3 of 5 steps.

    A whole-rank straggler, slow across every column step after step, is still found.
    """
    base = np.ones((8, 10))
    steps = [base.copy() for _ in range(5)]
    steps[0][3, 4] = 2.5  # a cell spike
    steps[3][3, :] = 1.6  # the whole rank spikes, twice
    steps[4][3, :] = 1.6
    det = Detector("j", DetectorParams())
    assert [ep for s, x in enumerate(steps) for ep in det.observe(matrix(x, step=s))] == []

    det = Detector("j", DetectorParams())
    slow = base.copy()
    slow[3, :] = 1.4
    slow[3, 6] = 1.5
    # opened at step 2 (3 of 5); a whole rank is reported once it stays slow, k = 3 slow steps: at step 4
    episodes = {id(ep): ep for s in range(5) for ep in det.observe(matrix(slow, step=s))}.values()
    assert [(ep.rank, ep.module, ep.first_step) for ep in episodes] == [(3, "m6", 2)]


def test_a_steps_waits_are_its_idle_time_where_known_else_its_backward_tail():
    """The one idle reading the detector, the episodes and the evaluator's collective waits start from."""
    m = matrix(np.ones((3, 2)), wait=[1.0, np.nan, 3.0])
    assert m.idle_or_tail_ms.tolist() == [1.0, 0.0, 3.0]  # no idle time known: the tail, a missing one as 0
    m.idle_ms = np.array([5.0, np.nan, 2.0])
    assert m.idle_or_tail_ms.tolist() == [5.0, 0.0, 2.0]  # idle time in any phase, even below the tail


@pytest.mark.parametrize("ranks, opens_on", [(8, 3), (64, 4)])
def test_a_large_job_needs_one_more_slow_step_among_its_many_cells(ranks, opens_on):
    """8 ranks x 40 columns (320 cells) open on 3 slow steps of 5; 64 x 40 (2,560 cells, over many_cells) on 4 of 6:
    among thousands of cells, noise puts 3 flags in 5 steps on one somewhere by chance."""
    for slow_steps in (opens_on - 1, opens_on):
        model = ClusterModel(ranks=ranks, modules=20, seed=7, sigma=0.02, spike_p=0.0, rank_spike_p=0.0)
        model.stragglers = [Straggler([3], module=5, phase=2, slowdown=1.6, onset=10, end=10 + slow_steps)]
        _, episodes = run(model, range(30))
        assert bool(episodes) == (slow_steps == opens_on), (ranks, slow_steps, episodes)
        if episodes:
            assert [ep.rank for ep in episodes] == [3]
