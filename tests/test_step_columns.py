"""Data loading, optimizer and GC pauses are wall time: a rank's figure there is a straggler only when its peers
waited for it.

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


def step_matrix(step, rng, data_extra=0.0, optimizer_extra=0.0, waited=True, module_extra=0.0, gc=None, gc_extra=0.0):
    """Rank 1 carries the extras. waited: its peers idle until it is done (a synchronous collective);
    otherwise every rank's wall stretches alike (its peers were held up too) and nobody idles for it.
    gc: every rank's full GC pauses (ms) this step; None: the agent reports none (no GC column)."""
    x = 5.0 + rng.normal(0, 0.05, (RANKS, MODULES))
    x[1, 2] += module_extra
    d = 2.0 + rng.normal(0, 0.05, RANKS)
    o = 3.0 + rng.normal(0, 0.05, RANKS)
    g = None if gc is None else gc + np.abs(rng.normal(0, 0.05, RANKS))
    d[1] += data_extra
    o[1] += optimizer_extra
    busy = x.sum(axis=1) + d + o
    if g is not None:
        g[1] += gc_extra
        busy += g  # a pause on the training thread: the rank is neither computing nor waiting
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
        gc_ms=g,
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


def test_a_slow_loader_whose_own_backward_tail_wait_is_the_longest_is_named():
    # Under FSDP its peers wait for it in the next forward's all-gathers; on shared cores its own wait in the
    # backward tail can be the step's longest (a kept FSDP2 job: 9-19 ms against its peers' 4-9): no victim for that.
    def make(s, rng):
        m = step_matrix(s, rng, data_extra=40.0 if s >= 10 else 0.0)
        m.sync_wait_ms = np.array([4.0, 18.0, 5.0]) if s >= 10 else np.full(RANKS, 4.0)
        return m

    found = episodes(make)
    assert [(ep.rank, ep.cause) for ep in found] == [(1, "data loading")]
    assert 10 <= found[0].first_step <= 13


@pytest.mark.parametrize("extra", ["data_extra", "optimizer_extra", "gc_extra"])
def test_data_optimizer_and_gc_wall_time_nobody_waited_for_opens_nothing(extra):
    assert episodes(lambda s, rng: step_matrix(s, rng, waited=False, gc=0.5, **{extra: 20.0 if s >= 10 else 0.0})) == []


def test_a_rank_pausing_in_garbage_collection_that_peers_wait_for_is_named():
    # Rank 1's full GCs take 40 ms more per step; its module times leave the pauses out, so they are its peers'.
    found = episodes(lambda s, rng: step_matrix(s, rng, gc=0.5, gc_extra=40.0 if s >= 10 else 0.0))
    assert [(ep.rank, ep.cause) for ep in found] == [(1, "garbage collection")]
    (ep,) = found
    assert 10 <= ep.first_step <= 14
    assert [(e["module"], e["phase"]) for e in ep.modules] == [("(garbage collection)", "gc")]
    assert ep.modules[0]["excess_ms"] == pytest.approx(40.0, abs=1.0)
    assert ep.excess_ms == pytest.approx(40.0, abs=1.0)


def test_a_full_collection_every_third_step_is_an_intermittent_gc_straggler():
    """The rate rule (4 of the last 20) takes the GC column, which reads 0 but while a collection runs; data loading
    and the optimizer, wall time that preemption stretches now and then on shared cores, stay on k of n."""
    found = episodes(lambda s, rng: step_matrix(s, rng, gc=0.0, gc_extra=40.0 if s >= 10 and s % 3 == 1 else 0.0))
    assert [(ep.rank, ep.cause) for ep in found] == [(1, "garbage collection, intermittent (1 step in 3)")]
    assert found[0].first_step <= 10 + 30
    wall = episodes(lambda s, rng: step_matrix(s, rng, optimizer_extra=40.0 if s >= 10 and s % 3 == 1 else 0.0))
    assert wall == []


def test_small_equal_gc_pauses_on_every_rank_open_nothing():
    assert episodes(lambda s, rng: step_matrix(s, rng, gc=3.0)) == []


def test_the_gc_column_keeps_its_key_when_an_earlier_step_column_is_missing():
    from modtrack.collector.pipeline.detector import judged_columns

    m = step_matrix(0, np.random.default_rng(0), gc=1.0)
    assert m.host_ms is None
    x, keys = judged_columns(m)
    assert keys.tolist() == [-1, -2, -4]  # data, optimizer, GC: the key says which, not the position
    assert x[:, -1].tolist() == m.gc_ms.tolist()


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


def test_host_code_between_forward_and_backward_is_its_own_cause_not_data_loading():
    # Rank 1's training loop runs 20 ms of its own code after the forward (a metric, logging): its peers wait.
    def make(s, rng):
        m = step_matrix(s, rng, data_extra=20.0 if s >= 10 else 0.0)
        m.host_ms = np.full(RANKS, 0.3)
        if s >= 10:
            m.host_ms[1] += 20.0  # the extra lies between its last module forward and its first module backward
        return m

    found = episodes(make)
    assert [(ep.rank, ep.cause) for ep in found] == [(1, "host time between modules")]
    assert [e["module"] for e in found[0].modules] == ["(host between modules)"]


def test_the_loops_code_between_forward_backward_and_optimizer_is_measured_from_the_timestamps():
    from modtrack.collector.pipeline.merge import JobSnapshot, build_matrix
    from modtrack.collector.records import StepRow

    ms = 1_000_000

    def row(rank, gap_ms, after_ms=0):
        # data loading 0-20 ms; forward: module 0 from 20 to 30 ms; backward: module 0 from 30 + gap to 38 + gap
        # ms (the pass ends there); the loop's code after the pass (gradient clipping, logging) for after_ms;
        # the optimizer for 2 ms, where the step ends
        end = 40 + gap_ms + after_ms
        figures = {"start_ns": 0, "end_ns": end * ms, "forward_ns": 10 * ms, "backward_ns": 8 * ms,
                   "optimizer_ns": 2 * ms, "data_ns": (20 + gap_ms + after_ms) * ms, "backward_tail_ns": 0,
                   "recompute_ns": 0, "gc_ns": 0, "gc_collections": 0, "host_ns": 0, "host_wait_ns": 0}  # fmt: skip
        modules = {"phase": np.array([1, 2], np.uint8), "module": np.array([0, 0], np.int64),
                   "calls": np.ones(2, np.uint32), "inclusive": np.array([10, 8]) * ms,
                   "self": np.array([10, 8]) * ms, "first_start": np.array([20, 30 + gap_ms]) * ms,
                   "last_end": np.array([30, 38 + gap_ms]) * ms}  # fmt: skip
        return StepRow("j", rank, 0, figures, modules)

    snapshot = JobSnapshot("j", ["Net"], {0: "h", 1: "h", 2: "h"}, cpu_clock=True)
    gaps = ((0, 1, 0), (1, 25, 0), (2, 1, 15))  # rank 2: 15 ms of its own code between the pass and the optimizer
    m = build_matrix(snapshot, 0, {rank: row(rank, gap, after) for rank, gap, after in gaps})
    assert m.host_ms.tolist() == [1.0, 25.0, 16.0]
    # the same steps as reports through ingest, which works the pass's marks out from the report's own lists
    parsed = {rank: _ingested(row(rank, gap, after)) for rank, gap, after in gaps}
    assert all(r.pass_marks is not None for r in parsed.values())
    assert build_matrix(snapshot, 0, parsed).host_ms.tolist() == [1.0, 25.0, 16.0]
    from modtrack.collector.pipeline.detector import judged_columns

    x, keys = judged_columns(m)
    assert keys.tolist() == [-1, -2, -3, -4]
    assert x[:, -4].tolist() == [20.0, 20.0, 20.0]  # data loading: what is left outside modules, less the host's code
    assert x[:, -2].tolist() == [1.0, 25.0, 16.0]
    assert x[:, -1].tolist() == [0.0, 0.0, 0.0]  # no GC pauses reported


def test_a_gc_pause_in_forward_is_the_rank_s_own_time_not_a_wait():
    """Module times leave a full GC's pause out and forward wall keeps it: the pause is GC, never waiting, so the
    peers' wait for the pausing rank is what tells it apart (on the CPU clock, waits are wall minus compute)."""
    from modtrack.collector.pipeline.merge import JobSnapshot, build_matrix
    from modtrack.collector.records import StepRow

    ms = 1_000_000

    def row(rank, gc_ms, wait_ms):
        # forward: module 0 computes 10 ms; the forward's wall holds the rank's GC pause and its wait for a peer
        forward = (10 + gc_ms + wait_ms) * ms
        figures = {"start_ns": 0, "end_ns": forward + 10 * ms, "forward_ns": forward, "backward_ns": 8 * ms,
                   "optimizer_ns": 2 * ms, "data_ns": 0, "backward_tail_ns": 0, "recompute_ns": 0,
                   "gc_ns": gc_ms * ms, "gc_collections": 1 if gc_ms else 0,
                   "host_ns": 0, "host_wait_ns": 0}  # fmt: skip
        modules = {"phase": np.array([1, 2], np.uint8), "module": np.array([0, 0], np.int64),
                   "calls": np.ones(2, np.uint32), "inclusive": np.array([10, 8]) * ms,
                   "self": np.array([10, 8]) * ms, "first_start": np.array([0, forward]),
                   "last_end": np.array([forward, forward + 8 * ms])}  # fmt: skip
        return StepRow("j", rank, 0, figures, modules)

    snapshot = JobSnapshot("j", ["Net"], {0: "h", 1: "h", 2: "h"}, cpu_clock=True)
    m = build_matrix(snapshot, 0, {0: row(0, 0, 40), 1: row(1, 40, 0), 2: row(2, 0, 40)})
    assert m.gc_ms.tolist() == [0.0, 40.0, 0.0]
    assert m.idle_ms.tolist() == [40.0, 0.0, 40.0]  # the pausing rank waited for nobody


@pytest.mark.parametrize("ranks", [3, 2])
@pytest.mark.parametrize("case", ["waits for the culprit in a clip", "the culprit blocked on its own write"])
def test_a_wait_in_the_loops_code_is_the_waiting_ranks_idle_time_and_a_rank_blocked_longest_is_not_waiting(case, ranks):
    """Rank 1 is 40 ms slow between its backward and its optimizer step. Gradient clipping under FSDP: its own code
    computes, and its peers block 40 ms in the clip's all-reduce there (their host time reads the same 41 ms).
    A write to a slow disk: rank 1 blocks there itself, and its peers wait for it in their next collective."""
    from modtrack.collector.pipeline.detector import DetectorParams, flag_step, judged_columns
    from modtrack.collector.pipeline.merge import JobSnapshot, build_matrix
    from modtrack.collector.records import StepRow

    ms = 1_000_000
    clip = case.startswith("waits")

    def row(rank):
        culprit = rank == 1
        host = 41 if clip or culprit else 1
        wait = (0 if culprit else 40) if clip else (40 if culprit else 0)
        elsewhere = 0 if clip or culprit else 40  # the peers' wait for a slow writer: in the next backward's tail
        figures = {"start_ns": 0, "end_ns": (30 + host + elsewhere) * ms, "forward_ns": 10 * ms,
                   "backward_ns": (8 + elsewhere) * ms, "optimizer_ns": 2 * ms, "data_ns": (10 + host) * ms,
                   "backward_tail_ns": elsewhere * ms, "recompute_ns": 0, "gc_ns": 0, "gc_collections": 0,
                   "host_ns": host * ms, "host_wait_ns": wait * ms}  # fmt: skip
        modules = {"phase": np.array([1, 2], np.uint8), "module": np.array([0, 0], np.int64),
                   "calls": np.ones(2, np.uint32), "inclusive": np.array([10, 8]) * ms,
                   "self": np.array([10, 8]) * ms, "first_start": np.array([10, 20]) * ms,
                   "last_end": np.array([20, 28 + elsewhere]) * ms}  # fmt: skip
        return StepRow("j", rank, 0, figures, modules)

    snapshot = JobSnapshot("j", ["Net"], dict.fromkeys(range(ranks), "h"), cpu_clock=True)
    m = build_matrix(snapshot, 0, {r: row(r) for r in range(ranks)})
    x, keys = judged_columns(m)
    host = x[:, keys.tolist().index(-3) - len(keys)]
    flags = flag_step(m, DetectorParams(), x)
    assert flags.flagged[:, -2].tolist() == [r == 1 for r in range(ranks)], (host, m.idle_ms)  # the host column
    assert host[1] >= 20 and all(host[r] <= 21 for r in range(ranks) if r != 1), host
    assert m.idle_ms[1] <= 20 and all(m.idle_ms[r] >= 20 for r in range(ranks) if r != 1), m.idle_ms


def _ingested(row):
    """A StepRow sent as the agent sends it (a StepReport, one PhaseStats per phase) and parsed by ingest."""
    from modtrack.collector.ingest.parse import RankStream, parse_report
    from modtrack.protos import modtrack_pb2 as pb

    report = pb.StepReport(step=row.step, **row.figures)
    m = row.modules
    for phase in np.unique(m["phase"]):
        at = m["phase"] == phase
        report.phases.append(
            pb.PhaseStats(
                phase=int(phase), module_id=m["module"][at].tolist(), calls=m["calls"][at].tolist(),
                inclusive_ns=m["inclusive"][at].tolist(), self_ns=m["self"][at].tolist(),
                first_start_ns=m["first_start"][at].tolist(), last_end_ns=m["last_end"][at].tolist(),
            )
        )  # fmt: skip
    stream = RankStream("j", row.rank, ["Net"], np.arange(1), None)
    return parse_report(report, stream, lambda names: np.arange(len(names)))


def test_a_spike_of_the_loops_code_the_job_lost_nothing_by_gets_no_verdict():
    # A clean DDP job on shared cores (CI): one rank's own code between its modules ran 5-6 ms long in 3 steps of 5
    # while its peers, their data loading as much shorter, waited for it; the job's step time did not grow.
    spikes = {20, 21, 23}

    def make(s, rng):
        m = step_matrix(s, rng)
        m.cpu_clock = True  # module times in CPU time: every rank's waits are known in every phase
        m.host_ms = np.full(RANKS, 0.6)
        m.data_ms += 10.0
        m.wall_ms += 10.0
        if s in spikes:
            m.host_ms[1] += 6.0
            m.data_ms[1] += 6.0  # the host's code is part of the time outside modules
            m.data_ms[[0, 2]] -= 6.0  # its peers' loaders ran as much faster ...
            m.sync_wait_ms[[0, 2]] += 6.0  # ... and they waited for it: every wall as before
            m.idle_ms = m.sync_wait_ms
        return m

    assert episodes(make) == []

    # the same spike, the job's step time growing by it: named (a persistent one, from its onset)
    def grows(s, rng):
        m = step_matrix(s, rng, data_extra=6.0 if s >= 20 else 0.0)
        m.cpu_clock = True
        return m

    found = episodes(grows)
    assert [(ep.rank, ep.cause) for ep in found] == [(1, "data loading")]
    assert found[0].cost_ms_per_step == pytest.approx(6.0, rel=0.15)
