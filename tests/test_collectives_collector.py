"""The collector's collective timing (collector/pipeline/collectives.py) over real gRPC from fake ranks,
with known truths: injected arrival skews (gloo: issue times), GPU active times (NCCL), a slow link; and
the edge refusing malformed stats while the collector keeps serving."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.collector_thread import CollectorThread
from harness.evaluated import wait_evaluated
from harness.fake_rank import FakeRank, report
from harness.http import get
from harness.waiting import wait_for
from modtrack.collector.ingest.collectives_parse import GroupStep
from modtrack.collector.pipeline.collectives import CollectiveBook, Windows, line_up, waits_in_windows
from modtrack.collector.records import Episode
from modtrack.protos import modtrack_pb2 as pb

MS = 1_000_000
STEP_NS = 1_000_000_000  # fake_rank.report's steps start at step * 1 s


def stats(step, group="0", size=4, seqs=(1, 2), issue=(0, 0), active=None, nbytes=0, backend="gloo"):
    s = pb.CollectiveStats(
        step=step, group=group, backend=backend, group_size=size, ranks_hash=hash(group) & 0xFFFF, count=len(seqs)
    )
    s.seq.extend(seqs)
    s.issue_ns.extend(int(step * STEP_NS + i) for i in issue)
    s.bytes = nbytes
    if active is not None:
        s.active_measured = True
        s.active_ns.extend(active)
        s.total_ns = sum(active)
    return s


def samples(text: str, name: str) -> dict:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def group(body, name):
    return next(g for g in body["groups"] if g["group"] == name)


def send_late_rank_3(collector, job: str, steps: int = 6) -> dict:
    """Four fake ranks, rank 3 issuing each of its two collectives per step 10 ms after rank 0 (rank 1: 3 ms,
    rank 2: 1 ms); the collector's summary once every step is lined up."""
    late = {0: 0, 1: 3 * MS, 2: 1 * MS, 3: 10 * MS}
    ranks = [FakeRank(collector.grpc_target, job, r, 4) for r in range(4)]
    for step in range(steps):
        for r, fr in enumerate(ranks):
            rep = report(step, [1.0] * 5)
            rep.collectives.append(stats(step, issue=(5 * MS + late[r], 50 * MS + late[r]), nbytes=4096))
            fr.report(rep)
    for fr in ranks:
        fr.wait_ack(steps - 1)
        fr.close()

    def summary():
        status, body = get(collector.url, f"/api/v1/jobs/{job}/collectives")
        return body if status == 200 and body["groups"] and body["groups"][0]["steps"] == steps else None

    return wait_for(summary, what=f"{steps} complete steps")


def test_gloo_the_last_to_arrive_is_named_and_every_peer_waits_its_skew(collector):
    job = "coll-gloo"
    g = group(send_late_rank_3(collector, job), "0")
    assert g["late_rank"] == 3 and g["size"] == 4 and g["transfer_ms"] is None and g["bytes_per_step"] == 4096
    waits = {r["rank"]: r["wait_ms"] for r in g["ranks"]}
    # per step: two collectives, each waiting (10 ms - the rank's own lateness)
    assert waits == {0: 20.0, 1: 14.0, 2: 18.0, 3: 0.0}
    assert abs(g["peer_wait_ms"] - (20 + 14 + 18) / 3) < 1e-9
    assert samples(get(collector.url, "/metrics")[1], "modtrack_collective_late_rank") == {
        (("group", "0"), ("job", job)): 3.0
    }
    # a verdict on rank 3 is explained by its lateness (the peers' injected wait); one on rank 0 is not
    book = collector.collector.ingest.collectives
    blamed = Episode(job, 3, "host3", "(data loading)", "data", 2.0, 1, 5, "active", 17.3)
    assert book.explain(blamed) == "last into 100% of group 0's collectives; its peers wait 17.3 ms per step there"
    assert book.explain(dataclasses.replace(blamed, rank=0)) == ""


def test_who_arrives_last_and_the_peers_waits_survive_a_restart_of_the_collector(tmp_path):
    first = CollectorThread(tmp_path / "data")
    try:
        before = send_late_rank_3(first, "coll-restart")
        first.flush_store()
    finally:
        first.stop()
    again = CollectorThread(tmp_path / "data")
    try:
        status, after = get(again.url, "/api/v1/jobs/coll-restart/collectives")
        assert status == 200 and after == before and group(after, "0")["late_rank"] == 3
        blamed = Episode("coll-restart", 3, "host3", "(data loading)", "data", 2.0, 1, 5, "active", 17.3)
        assert again.collector.ingest.collectives.explain(blamed).startswith("last into 100% of group 0's")
    finally:
        again.stop()


def test_nccl_waits_come_from_gpu_active_time_and_a_slow_link_is_its_group(collector):
    """Two TP groups of 2 (ranks 0,1 and 2,3): group "b" has a slow link, every member spends 30 ms more
    in its all-reduce; in group "a" rank 0's kernel waits 5 ms for rank 1 (whose host called it first)."""
    job = "coll-nccl"
    base = 2 * MS
    active = {0: base + 5 * MS, 1: base, 2: base + 30 * MS, 3: base + 30 * MS}
    issue = {0: 9 * MS, 1: 0, 2: 0, 3: 0}  # host issue order disagrees with the GPU: NCCL reads the GPU
    ranks = [FakeRank(collector.grpc_target, job, r, 4) for r in range(4)]
    for step in range(3):
        for r, fr in enumerate(ranks):
            rep = report(step, [1.0] * 5)
            name = "a" if r < 2 else "b"
            rep.collectives.append(stats(step, name, 2, (1,), (issue[r],), [active[r]], backend="nccl"))
            fr.report(rep)
    for fr in ranks:
        fr.wait_ack(2)
    body = wait_for(
        lambda: (lambda b: b if len(b["groups"]) == 2 and all(g["steps"] == 3 for g in b["groups"]) else None)(
            get(collector.url, f"/api/v1/jobs/{job}/collectives")[1]
        ),
        what="both groups' 3 steps",
    )
    a, b = group(body, "a"), group(body, "b")
    assert a["active_measured"] and a["transfer_ms"] == 2.0 and b["transfer_ms"] == 32.0
    assert {r["rank"]: r["wait_ms"] for r in a["ranks"]} == {0: 5.0, 1: 0.0}
    assert a["late_rank"] == 1  # the GPU arrival: rank 1's kernel started last (its peer spun 5 ms)
    assert b["slow_link"] and not a["slow_link"] and b["late_rank"] is None
    for fr in ranks:
        fr.close()


def test_malformed_collective_stats_are_refused_with_the_field_and_the_collector_keeps_serving(collector):
    fr = FakeRank(collector.grpc_target, "coll-bad", 0, 1)
    rep = report(0, [1.0] * 5)
    bad = stats(0, size=1, seqs=(1, 2), issue=(0,))  # two seqs, one issue time
    rep.collectives.append(bad)
    fr.report(rep)
    fr.wait_done()
    assert fr.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one entry per listed collective" in fr.error.details()
    fr2 = FakeRank(collector.grpc_target, "coll-bad", 0, 1, session="s2")
    rep = report(1, [1.0] * 5)
    rep.collectives.append(stats(1, size=1, seqs=(1,), issue=(0,)))
    fr2.report(rep)
    fr2.wait_ack(1)
    fr2.close()


def test_only_collectives_every_member_listed_are_lined_up():
    def step(seq, issue, offset=0):
        s = GroupStep(
            0, "0", "gloo", 2, 1, len(seq), 0, 0, 0, False, 0, np.array(seq, np.uint64), np.array(issue, np.int64), None
        )
        return (s, offset)

    # rank 1's clock runs 100 ns behind: its offset brings it back; seq 3 is rank 0's alone (rank 1 left it
    # unlisted past its bound): not lined up
    lined = line_up({0: step([1, 2, 3], [0, 10, 20]), 1: step([2, 1], [-85, -80], offset=100)})
    assert lined is not None and lined.collectives == 2
    assert lined.wait_ns.tolist() == [20 + 5, 0] and lined.last.tolist() == [0, 2]


def test_groups_past_the_limit_are_counted_in_metrics():
    """A job with more process groups than the book keeps: the ones past the limit are counted per job."""
    book = CollectiveBook(max_groups=2)

    def group_step(name):
        return GroupStep(
            0, name, "gloo", 1, 1, 1, 0, 0, 0, False, 0, np.array([1], np.uint64), np.array([0], np.int64), None
        )

    book.add("many", 0, 0, 0, [group_step(str(g)) for g in range(5)])
    book.add("few", 0, 0, 0, [group_step("0")])
    refused = {
        s.labels["job"]: s.value
        for family in book.collect()
        for s in family.samples
        if s.name == "modtrack_collective_groups_refused_total"
    }
    assert refused == {"many": 3}


@pytest.mark.parametrize("cause", ["module", "data"])
def test_waits_inside_module_windows_are_seen_through_the_collectives_and_cost_what_the_job_lost(collector, cause):
    """Durations that hold the waits (CUDA events, host wall time) under FSDP: from step 10 rank 1 computes
    30 ms more in module 1 (or loads its batch 30 ms longer) and issues its all-gather 30 ms late; ranks 0 and
    2 wait for it inside module 2's window. Nothing outside a module shows the wait, so only the collectives
    tell that the job's step grew by what rank 1's peers waited for it. Truth: every step goes 100 -> 130 ms."""
    job = f"coll-in-window-{cause}"
    ranks = [FakeRank(collector.grpc_target, job, r, 3) for r in range(3)]
    for step in range(30):
        slow = step >= 10
        for r, fr in enumerate(ranks):
            fwd, data_ms = [1.0, 2.0, 3.0, 4.0, 5.0], 2.0
            if slow and r != 1:
                fwd[2] += 30.0
            elif slow and cause == "module":
                fwd[1] += 30.0
            elif slow:
                data_ms += 30.0
            wall = 130.0 if slow else 100.0
            rep = report(step, fwd, bwd_ms=[1.0, 2.0, 3.0, 4.0, 5.0], wall_ms=wall, data_ns=int(data_ms * MS))
            late = 30 * MS if slow and r == 1 else 0
            rep.collectives.append(stats(step, size=3, issue=(5 * MS, 40 * MS + late)))
            fr.report(rep)
    for fr in ranks:
        fr.wait_ack(29)
    wait_evaluated(collector.url, 29, job)
    _, body = get(collector.url, f"/api/v1/jobs/{job}/stragglers")
    (verdict,) = body["stragglers"]
    named = ("Net.embed", "forward") if cause == "module" else ("(data loading)", "data")
    assert (verdict["rank"], verdict["module"], verdict["phase"]) == (1, *named)
    assert abs(verdict["cost_ms_per_step"] - 30.0) <= 0.15 * 30.0, verdict
    for fr in ranks:
        fr.close()


FSDP_MODULES = ["Net", "Net.embed", "Net.blocks.0", "Net.blocks.1", "Net.head"]


def fsdp_step(
    step: int, fwd_ms: list[float], bwd_ms: list[float], issue: list[int], waits: dict, micro: int = 1
) -> pb.StepReport:
    """One FSDP rank's step on wall-clock durations: the root's window holds its children's, one after the other
    (forward, then backward in reverse), each child but the first all-gathers its shard as it begins (seq = its
    order of issue). `waits`: child -> ms its all-gather held it in its own window (its peers came in that much
    later). `micro` micro-batches (gradient accumulation): forward and backward that many times, so every module
    is called `micro` times in each phase, and the report carries each call's window, as the agent sends them."""
    t = step * STEP_NS
    rep = pb.StepReport(step=step, start_ns=t, backward_tail_ns=MS * micro)
    calls: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}  # (phase, module) -> (start, end, self, incl)
    for _ in range(micro):
        for phase, children in ((pb.PHASE_FORWARD, [1, 2, 3, 4]), (pb.PHASE_BACKWARD, [4, 3, 2, 1])):
            begin = t = t + MS
            for m in children:
                self_ms = fwd_ms[m] + waits.get(m, 0.0) if phase == pb.PHASE_FORWARD else bwd_ms[m]
                if phase == pb.PHASE_FORWARD and m > 1:
                    issue.append(t)
                calls.setdefault((phase, m), []).append((t, t + int(self_ms * MS), int(self_ms * MS), 0))
                t += int(self_ms * MS)
            calls.setdefault((phase, 0), []).append((begin - MS // 2, t + MS // 2, MS, t - begin + MS))
            if phase == pb.PHASE_FORWARD:
                rep.forward_ns += t + MS // 2 - begin + MS // 2
            else:
                rep.backward_ns += t + MS // 2 - begin + MS // 2 + MS
            t += MS
    for phase in (pb.PHASE_FORWARD, pb.PHASE_BACKWARD):
        stats = pb.PhaseStats(phase=phase)
        for m in range(5):
            spans = calls[(phase, m)]
            stats.module_id.append(m)
            stats.calls.append(len(spans))
            stats.first_start_ns.append(min(s for s, _, _, _ in spans))
            stats.last_end_ns.append(max(e for _, e, _, _ in spans))
            stats.self_ns.append(sum(own for _, _, own, _ in spans))
            stats.inclusive_ns.append(sum(incl or own for _, _, own, incl in spans))
            if len(spans) > 1:
                stats.call_start_ns.extend(s for s, _, _, _ in spans)
                stats.call_end_ns.extend(e for _, e, _, _ in spans)
        rep.phases.append(stats)
    rep.end_ns = t + 10 * MS  # the optimizer and the next batch
    rep.data_ns = 10 * MS
    return rep


def fsdp_hellos(collector, job: str, world: int, one_host: bool = False) -> list[FakeRank]:
    """`world` fake ranks whose Hello says their module durations are wall time (they hold collective waits)."""
    ranks = [FakeRank(collector.grpc_target, job, r, world, modules=FSDP_MODULES, hello=False) for r in range(world)]
    for r, fr in enumerate(ranks):
        host = "host" if one_host else f"host{r}"
        hello = pb.Hello(protocol_version=1, job=job, rank=r, world_size=world, host=host, pid=1000 + r)
        hello.module_names.extend(FSDP_MODULES)
        hello.clock_kind, hello.wall_durations, hello.session = pb.CLOCK_KIND_CPU, True, "s"
        fr.send(pb.AgentMessage(hello=hello))
    return ranks


def run_rank_1_slow_in_blocks_0(collector, job: str, ranks: list[FakeRank], extra_ms: float = 30.0, micro: int = 1):
    """30 steps of the fake FSDP job (`micro` micro-batches a step): from step 10 rank 1 computes `extra_ms` more in
    Net.blocks.0's forward in each micro-batch and every other rank waits as long for it inside Net.blocks.1; all of
    it acked and evaluated."""
    base = [1.0, 4.0, 6.0, 6.0, 3.0]
    for step in range(30):
        slow = step >= 10
        for r, fr in enumerate(ranks):
            fwd = list(base)
            waits = {}
            if slow and r == 1:
                fwd[2] += extra_ms
            elif slow:
                waits[3] = extra_ms
            issue: list[int] = []
            rep = fsdp_step(step, fwd, base, issue, waits, micro=micro)
            seqs, issued = range(2, 2 + len(issue)), [i - step * STEP_NS for i in issue]
            rep.collectives.append(stats(step, size=len(ranks), seqs=seqs, issue=issued))
            fr.report(rep)
    for fr in ranks:
        fr.wait_ack(29)
    wait_evaluated(collector.url, 29, job)


def rank_1_alone_in_blocks_0(collector, job: str) -> dict:
    """The job's one verdict, which must name rank 1 in Net.blocks.0's forward and nothing else."""
    _, body = get(collector.url, f"/api/v1/jobs/{job}/stragglers")
    assert [v["rank"] for v in body["stragglers"]] == [1], body["stragglers"]
    (verdict,) = body["stragglers"]
    assert [(e["module"], e["phase"]) for e in verdict["modules"]] == [("Net.blocks.0", "forward")], verdict
    return verdict


@pytest.mark.parametrize("world", [2, 4])
def test_waits_inside_module_windows_are_taken_out_of_that_module_so_no_victim_is_named(collector, world):
    """Wall-clock durations under FSDP (the Hello says so): from step 10 rank 1 computes 30 ms more in
    Net.blocks.0's forward and so all-gathers Net.blocks.1's shard 30 ms late; its peers wait for it inside
    Net.blocks.1's window, which shows 30 ms more there on them. Truth: the job loses 30 ms a step to rank 1's
    Net.blocks.0, and no other rank is slow anywhere: the verdict names rank 1 in Net.blocks.0 alone, with that
    cost. With module times as they come, the 2-rank job also blamed rank 0 in Net.blocks.1 (its wait); with 4
    ranks the waiting peers are the majority there."""
    job = f"coll-fsdp-wall-{world}"
    ranks = fsdp_hellos(collector, job, world)
    run_rank_1_slow_in_blocks_0(collector, job, ranks)
    verdict = rank_1_alone_in_blocks_0(collector, job)
    assert abs(verdict["cost_ms_per_step"] - 30.0) <= 0.15 * 30.0, verdict
    for fr in ranks:
        fr.close()


def test_the_ranks_of_one_host_line_their_collectives_up_on_its_best_clock_offset(collector):
    """Both ranks run on one host (one monotonic clock): rank 1's clock offset came from a sample with a 12 ms
    round trip and is 5 ms off, rank 0's from a 0.5 ms one and exact. From step 10 rank 1 computes 30 ms more in
    Net.blocks.0's forward and rank 0 waits 30 ms for it in Net.blocks.1. Truth: 30 ms a step lost to rank 1's
    Net.blocks.0, nowhere else. Read through rank 1's own offset its arrivals came 5 ms early, rank 0's waits
    ended 5 ms short of where it resumed and those 5 ms stayed in Net.blocks.1: rank 0 was blamed there too."""
    job = "coll-fsdp-one-host"
    ranks = fsdp_hellos(collector, job, 2, one_host=True)
    for fr, (offset, rtt) in zip(ranks, [(0, MS // 2), (-5 * MS, 12 * MS)]):
        fr.send(pb.AgentMessage(clock=pb.ClockOffset(offset_ns=offset, rtt_ns=rtt)))
    # The two streams run concurrently: on a loaded host rank 1's stream took in its own sample and its first
    # reports before rank 0's sample was in, and those steps' collectives were lined up on rank 1's worse offset
    # (rank 0 blamed for a step, at no cost). What the host's best sample gives is the subject here.
    jobs = collector.collector.merger.jobs
    wait_for(
        lambda: job in jobs and jobs[job].host_clocks.get("host") == (MS // 2, 0, 0),
        timeout=30,
        what="rank 0's clock sample taken in",
    )
    run_rank_1_slow_in_blocks_0(collector, job, ranks)
    rank_1_alone_in_blocks_0(collector, job)
    for fr in ranks:
        fr.close()


def test_waits_in_a_module_called_several_times_in_a_phase_are_taken_out_of_its_calls(collector):
    """Gradient accumulation (2 micro-batches a step): every module is called twice in each phase, and a module's
    first start and last end span the other micro-batch's forward or backward too. From step 10 rank 1 computes
    15 ms more in Net.blocks.0's forward in each micro-batch, and its peer waits 15 ms inside each of its
    Net.blocks.1 calls. Truth: 30 ms a step lost to rank 1's Net.blocks.0, nowhere else. From each call's window
    (PhaseStats.call_start_ns) the waits come out of Net.blocks.1; from first start and last end alone they stayed
    there and rank 0 was blamed in Net.blocks.1 as well."""
    job = "coll-fsdp-wall-micro"
    ranks = fsdp_hellos(collector, job, 2)
    run_rank_1_slow_in_blocks_0(collector, job, ranks, extra_ms=15.0, micro=2)
    verdict = rank_1_alone_in_blocks_0(collector, job)
    assert abs(verdict["cost_ms_per_step"] - 30.0) <= 0.15 * 30.0, verdict
    for fr in ranks:
        fr.close()


def test_nccl_waits_are_placed_where_the_kernel_that_waited_ended():
    """NCCL (the GPU's arrival): rank 0's all-reduce kernel spins 5 ms for rank 1's; a kernel starts when issued
    and ends `active` later, so rank 0's wait ends 2 + 5 ms after its issue, inside module 7's window (rank 0's
    compute stream waits there), and only the part since module 7's child ended counts."""

    def nccl(issue, active):
        s = GroupStep(
            0, "tp", "nccl", 2, 1, 1, active, 0, 0, True, 0, np.array([1], np.uint64), np.array([issue]), None
        )
        s.active_ns = np.array([active], np.int64)
        return (s, 0)

    lined = line_up({0: nccl(100 * MS, 7 * MS), 1: nccl(104 * MS, 2 * MS)})
    assert lined is not None and lined.waits.tolist() == [[5 * MS], [0]] and lined.ends[0].tolist() == [107 * MS]
    # rank 0: module 7 (key 7) from 90 ms to 120 ms, its child (key 9) from 95 to 103 ms
    windows = Windows(np.array([7, 9]), np.array([90, 95]) * MS, np.array([120, 103]) * MS)
    start = lined.ends[0] - lined.waits[0]
    columns, ns = waits_in_windows(windows, start, lined.ends[0])
    assert columns.tolist() == [7] and ns.tolist() == [4 * MS]  # 103 -> 107 ms: after the child, in 7's own code


@pytest.mark.parametrize("error_ms, counted_ms", [(0.0, 30.0), (0.1, 30.0), (1.5, 30.0), (-1.5, 28.5)])
def test_a_wait_ends_where_the_rank_resumed_when_it_is_measured_late(error_ms, counted_ms):
    """A rank blocks 30 ms in an all-gather in module 7's own code (from 10 ms: module 7 runs 9 to 45 ms, its
    child 9 from 40 ms, the moment the last rank came in and it could go on). The wait's end is the last rank's
    arrival read through both ranks' clock offsets, off by `error_ms` (1.6 ms between two ranks of one busy host
    seen on a real job). Measured late (or right at the child's start) it fell into child 9 and only what lay
    past 40 ms was counted, in 9: now the full 30 ms, in module 7. Measured early, what was measured: the rank's
    own code after it cannot be told from compute."""
    windows = Windows(np.array([7, 9]), np.array([9, 40]) * MS, np.array([45, 44]) * MS)
    start, end = np.array([10 * MS]), np.array([int((40 + error_ms) * MS)])
    columns, ns = waits_in_windows(windows, start, end)
    assert columns.tolist() == [7] and ns.tolist() == [int(counted_ms * MS)]


def test_a_due_step_waits_for_its_collective_stats_in_order_and_at_most_the_hold():
    """The evaluator holds a due step until its stats are in (collectives_in) or collective_hold_s passed, and
    a job's later steps wait behind it; another job's steps go on."""
    from modtrack.collector.pipeline.evaluator import Evaluator
    from modtrack.collector.pipeline.merge import JobSnapshot, ReadyStep

    evaluator = Evaluator.__new__(Evaluator)  # only the hold's state: no store, pool or outputs
    evaluator._held, evaluator.collective_hold_s = [], 15.0
    stats_in = {("a", 1)}
    evaluator.collectives_in = lambda job, step: job == "b" or (job, step) in stats_in

    def due(job, step):
        return ReadyStep(JobSnapshot(job, [], {}, True), step, {}, 0.0)

    def steps(items):
        return [(i.job.job, i.step) for i in items]

    assert steps(evaluator._release([due("a", 1), due("a", 2), due("a", 3), due("b", 1)], now=0.0)) == [
        ("a", 1),
        ("b", 1),
    ]
    stats_in.add(("a", 3))  # step 3's stats are in, step 2's are not: 3 waits behind 2
    assert steps(evaluator._release([], now=1.0)) == []
    stats_in.add(("a", 2))
    assert steps(evaluator._release([due("a", 4)], now=2.0)) == [("a", 2), ("a", 3)]
    assert steps(evaluator._release([], now=16.9)) == [] and steps(evaluator._release([], now=17.0)) == [("a", 4)]
    assert evaluator._held == []
