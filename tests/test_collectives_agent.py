"""agent/collectives.py at its seams: NCCL's completion hook faked with WorkInfo-like objects (no GPU here),
fired from another thread as torch's hook thread does; the Flight Recorder faked with its dump's entries."""

from __future__ import annotations

import datetime
import threading
from types import SimpleNamespace as NS

from modtrack.agent import collectives as col
from modtrack.agent.collectives import Collectives, ranks_hash
from modtrack.agent.report_codec import encode_report
from modtrack.agent.step_record import StepRecord

WALL0 = 1_800_000_000 * 10**9  # system clock ns at agent-clock 0 (the fake clocks below)
MS = 1_000_000


class FakeClock:
    def __init__(self):
        self.now = 0

    def agent(self) -> int:
        return self.now

    def wall(self) -> int:
        return WALL0 + self.now


class FakeNcclGroup:
    """The ProcessGroup surface the agent uses: timing switch and the one completion hook."""

    def __init__(self, refuse: bool = False):
        self.hook = None
        self.timing = False
        self.refuse = refuse

    def _enable_collectives_timing(self):
        self.timing = True

    def _register_on_completion_hook(self, hook):
        if self.refuse or self.hook is not None:
            raise RuntimeError("ProcessGroupNCCL OnCompletion hook already registered")
        self.hook = hook

    def size(self):
        return 2


def fake_c10d(groups: dict, backend: str = "nccl"):
    """torch.distributed.distributed_c10d as the agent reads it: groups by name, their global ranks."""
    world = NS(
        pg_names={pg: name for name, pg in groups.items()}, pg_group_ranks={pg: {0: 0, 1: 1} for pg in groups.values()}
    )
    return NS(is_initialized=lambda: True, _world=world, get_backend=lambda pg: backend)


def work_info(seq: int, started_ns: int, finished_ns: int, active_ns: int, op: str = "ALLREDUCE"):
    """A WorkInfo as pybind11 hands it over: system-clock datetimes (naive, local) and a timedelta."""
    return NS(
        op_type=NS(name=op),
        seq=seq,
        time_started=datetime.datetime.fromtimestamp((WALL0 + started_ns) / 1e9),
        time_finished=datetime.datetime.fromtimestamp((WALL0 + finished_ns) / 1e9),
        active_duration=datetime.timedelta(microseconds=active_ns / 1000),
    )


def record(step: int, start_ms: int, end_ms: int):
    return NS(step=step, start_ns=start_ms * MS, end_ns=end_ms * MS, collectives=[])


def test_nccl_hook_events_become_per_step_group_stats_after_the_grace():
    clock = FakeClock()
    pg = FakeNcclGroup()
    c = Collectives(c10d=fake_c10d({"0": pg}), clock=clock.agent, wall=clock.wall, hook_grace_s=0.5)
    c.attach([])  # learns the group, hooks it
    assert pg.timing and pg.hook is not None
    # step 0 runs 0..100 ms: two all-reduces, one send (p2p: not a group collective), fired on another thread
    fired = [
        work_info(1, 10 * MS, 30 * MS, 5 * MS),
        work_info(2, 60 * MS, 95 * MS, 20 * MS),
        work_info(3, 70 * MS, 80 * MS, 1 * MS, op="SEND"),
        work_info(4, 120 * MS, 150 * MS, 7 * MS),  # step 1's
    ]
    thread = threading.Thread(target=lambda: [pg.hook(w) for w in fired])
    thread.start()
    thread.join()
    step0, step1 = record(0, 0, 100), record(1, 100, 200)
    clock.now = 300 * MS  # step 0 ended 200 ms ago: within the 500 ms grace, not final yet
    c.attach([step0])
    assert not step0.collectives
    clock.now = 700 * MS
    c.attach([step1])
    stats = {s.step: s for s in step1.collectives}
    assert set(stats) == {0, 1}  # step 1 ended 500 ms ago: final too
    s = stats[0]
    assert (s.group, s.backend, s.group_size, s.ranks_hash) == ("0", "nccl", 2, ranks_hash([1, 0]))
    assert s.count == 2 and s.seq == [1, 2] and s.active_measured
    assert s.active_ns == [5 * MS, 20 * MS] and s.total_ns == 25 * MS
    assert s.wait_ns == (30 - 10 - 5) * MS + (95 - 60 - 20) * MS  # issue -> seen done, minus active
    # issue times back on the agent clock (WorkInfo has microseconds)
    assert [abs(i - t) < 2000 for i, t in zip(s.issue_ns, (10 * MS, 60 * MS))] == [True, True]
    assert stats[1].seq == [4]
    assert c.counters["collectives"] == 3 and c.counters["collective_errors"] == 0


def test_a_group_whose_hook_is_taken_falls_back_to_the_flight_recorder():
    clock = FakeClock()
    pg = FakeNcclGroup(refuse=True)
    entries = [
        {
            "record_id": 0,
            "process_group": ("0", "default_pg"),
            "collective_seq_id": 1,
            "time_created_ns": WALL0 + 20 * MS,
            "input_sizes": [[1000], [10, 10]],
            "input_dtypes": ["Float", "BFloat16"],
            "is_p2p": False,
        }
    ]
    c = Collectives(c10d=fake_c10d({"0": pg}), dump=lambda: entries, clock=clock.agent, wall=clock.wall)
    clock.now = 150 * MS
    step0 = record(0, 0, 100)
    c.attach([step0])
    (s,) = step0.collectives
    assert s.seq == [1] and s.bytes == 4000 + 200 and not s.active_measured and s.active_ns == []
    assert abs(s.issue_ns[0] - 20 * MS) < 1000
    assert c.counters["collective_errors"] == 1  # the refused hook, counted


def test_flight_recorder_ring_overrun_is_counted_and_dumps_are_rate_limited_by_their_cost():
    clock = FakeClock()
    dumps = []

    def dump():
        dumps.append(clock.now)
        ids = (0, 1) if len(dumps) == 1 else (5, 6)  # 2, 3, 4 were overwritten between the dumps
        return [
            {
                "record_id": i,
                "process_group": ("0", ""),
                "collective_seq_id": i + 1,
                "time_created_ns": WALL0 + clock.now - MS,
            }
            for i in ids
        ]

    c = Collectives(
        c10d=fake_c10d({"0": object()}, "gloo"), dump=dump, clock=clock.agent, wall=clock.wall, fr_interval_s=1.0
    )
    clock.now = 100 * MS
    c.attach([record(0, 0, 100 * MS)])
    clock.now = 500 * MS
    c.attach([record(1, 100, 500)])  # within the interval: no dump
    assert len(dumps) == 1
    clock.now = 1200 * MS
    c.attach([record(2, 500, 1200)])
    assert len(dumps) == 2 and c.counters["collectives_dropped"] == 3


def test_bounded_lists_and_a_full_hook_queue_are_counted_not_grown(monkeypatch):
    monkeypatch.setattr(col, "MAX_LISTED", 3)
    monkeypatch.setattr(col, "MAX_EVENTS", 5)
    clock = FakeClock()
    pg = FakeNcclGroup()
    c = Collectives(c10d=fake_c10d({"0": pg}), clock=clock.agent, wall=clock.wall, hook_grace_s=0)
    c.attach([])
    for seq in range(8):
        pg.hook(work_info(seq, (10 + seq) * MS, (11 + seq) * MS, MS // 2))
    assert c.counters["collectives_dropped"] == 3  # the hook thread never waits: 5 kept, 3 counted
    clock.now = 200 * MS
    step0 = record(0, 0, 100)
    c.attach([step0])
    (s,) = step0.collectives
    assert s.count == 5 and len(s.seq) == 3 and s.unlisted == 2 and s.total_ns == 5 * (MS // 2)


def test_nothing_before_the_process_group_exists_and_no_torch_distributed_is_quiet():
    c = Collectives(c10d=NS(is_initialized=lambda: False))
    r = record(0, 0, 100)
    c.attach([r])
    assert not r.collectives and c.counters["collective_errors"] == 0


def test_stats_ride_the_report_on_the_wire():
    rec = StepRecord(step=7, start_ns=0, end_ns=10)
    rec.collectives = [
        col.GroupStats(6, "0", "nccl", 2, 42, 2, 25, 3, 0, True, [1, 2], [5, 9], [10, 15], 0),
    ]
    msg = encode_report(rec, {"reports_dropped": 0, "reconnects": 0, "hook_errors": 0, "send_errors": 0})
    (wire,) = msg.report.collectives
    assert (wire.step, wire.group, wire.count, wire.total_ns, list(wire.seq), list(wire.active_ns)) == (
        6,
        "0",
        2,
        25,
        [1, 2],
        [10, 15],
    )


def test_at_exit_the_last_steps_stats_are_read_at_once_whatever_the_rate_limit():
    """A rank exits before its next Flight Recorder dump is due: final() dumps anyway and hands out the last
    steps' stats (the transport resends its last report with them), else the collector never sees them."""
    clock = FakeClock()
    created: list[int] = []

    def dump():
        return [
            {"record_id": i, "process_group": ("0", ""), "collective_seq_id": i + 1, "time_created_ns": WALL0 + t}
            for i, t in enumerate(created)
        ]

    c = Collectives(
        c10d=fake_c10d({"0": object()}, "gloo"), dump=dump, clock=clock.agent, wall=clock.wall, fr_interval_s=10.0
    )
    created.append(50 * MS)
    clock.now = 100 * MS
    first = record(0, 0, 100)
    c.attach([first])
    assert [s.seq for s in first.collectives] == [[1]]
    created.append(150 * MS)
    clock.now = 200 * MS
    last = record(1, 100, 200)
    c.attach([last])  # the next dump is 10 s away: step 1 is not final
    assert not last.collectives
    (s,) = c.final()
    assert (s.step, s.seq) == (1, [2]) and c.counters["fr_dumps"] == 2
