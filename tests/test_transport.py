"""The agent's transport over real gRPC on loopback, against a small in-test collector."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.collector_thread import CollectorThread
from harness.fake_collector import FakeCollector
from harness.http import get
from harness.ports import free_port
from harness.waiting import wait_for
from modtrack.agent import transport as transport_module
from modtrack.agent.heartbeat import Heartbeat
from modtrack.agent.identity import Identity
from modtrack.agent.report_codec import encode_report, fill_report, wire_bytes_bound
from modtrack.agent.step_record import PhaseColumns, StepRecord, TraceColumns
from modtrack.agent.transport import Transport
from modtrack.protos import modtrack_pb2 as pb

IDENTITY = Identity(job="j", rank=1, local_rank=1, world_size=2, group_rank=0, host="h", pid=7)
NAMES = ["Net", "Net.a", "Net.b"]


def make_record(step: int, n: int = 3) -> StepRecord:
    ids = np.arange(n, dtype=np.uint32)
    ns = np.full(n, 1000 + step, dtype=np.int64)
    cols = PhaseColumns(ids, np.ones(n, np.uint32), ns, ns // 2, ns, ns * 2)
    return StepRecord(
        step=step,
        start_ns=step * 10,
        end_ns=step * 10 + 9,
        forward_ns=3,
        backward_ns=4,
        first_new_module_id=0 if step == 0 else n,
        new_module_names=list(NAMES[:n]) if step == 0 else [],
        phases={"forward": cols, "backward": cols},
    )


@pytest.fixture
def transports():
    made = []

    def make(port, **kw):
        kw.setdefault("backoff_initial_s", 0.05)
        kw.setdefault("backoff_max_s", 0.2)
        kw.setdefault("connect_timeout_s", 0.5)
        t = Transport(f"127.0.0.1:{port}", IDENTITY, **kw)
        made.append(t)
        return t

    try:
        yield make
    finally:
        for t in made:
            t.close(timeout_s=0.5)


def test_hello_reports_and_acks(serve, transports):
    fake = FakeCollector()
    _, port = serve(fake)
    t = transports(port, token="s3cret").start()
    for step in range(5):
        t.submit(make_record(step))
    wait_for(lambda: t.stats["acked_step"] == 4)
    ((_, hello),) = fake.hellos
    assert (hello.job, hello.rank, hello.world_size, hello.host, hello.pid) == ("j", 1, 2, "h", 7)
    assert list(hello.module_names) in ([], NAMES)  # names known at connect, the rest in reports
    assert fake.received == [0, 1, 2, 3, 4]
    assert fake.metadata[0]["authorization"] == "Bearer s3cret"
    r = fake.reports[3]
    assert [p.phase for p in r.phases] == [pb.PHASE_FORWARD, pb.PHASE_BACKWARD]
    assert list(r.phases[0].inclusive_ns) == [1003] * 3 and list(r.phases[0].self_ns) == [501] * 3
    assert t.stats["unacked"] == 0


def test_waiting_steps_go_in_one_message(serve, transports):
    fake = FakeCollector()
    _, port = serve(fake)
    t = transports(port)
    for step in range(20):  # all waiting when the sender starts
        t.submit(make_record(step))
    t.start()
    wait_for(lambda: t.stats["acked_step"] == 19)
    assert fake.messages == [list(range(20))]
    assert list(fake.reports[0].new_module_names) == NAMES or list(fake.hellos[0][1].module_names) == NAMES
    t.submit(make_record(20))
    wait_for(lambda: t.stats["acked_step"] == 20)  # a step alone goes at the next flush
    assert fake.messages[1:] == [[20]] and t.stats["reports_sent"] == 21


def test_a_collector_that_predates_batches_gets_one_report_per_message(serve, transports):
    fake = FakeCollector(batches=False)
    _, port = serve(fake)
    t = transports(port)
    for step in range(5):
        t.submit(make_record(step))
    t.start()
    wait_for(lambda: t.stats["acked_step"] == 4)
    t.submit(make_record(5))
    wait_for(lambda: t.stats["acked_step"] == 5)
    assert fake.messages == [[0], [1], [2], [3], [4], [5]]  # the refused batch replayed one by one
    assert t.counters["reports_dropped"] == 0 and len(fake.hellos) == 2


def test_a_message_stays_within_its_byte_bound(serve, transports, monkeypatch):
    monkeypatch.setattr(transport_module, "MAX_BATCH_BYTES", 2 * wire_bytes_bound(make_record(1, n=20)) + 100)
    fake = FakeCollector()
    _, port = serve(fake)
    t = transports(port)
    for step in range(7):
        t.submit(make_record(step, n=20) if step != 3 else make_record(step, n=200))  # step 3 alone is over it
    t.start()
    wait_for(lambda: t.stats["acked_step"] == 6)
    assert fake.messages == [[0, 1], [2], [3], [4, 5], [6]]


def test_wire_bytes_bound_is_an_upper_bound():
    worst = make_record(5, n=50)
    for cols in worst.phases.values():
        cols.inclusive_ns[:] = -(2**62)  # negative varints take 10 bytes
        cols.first_start_ns[:] = 2**62
        cols.module_id[:] = 2**32 - 1
        cols.calls[:] = 2**32 - 1
    worst.trace = TraceColumns(
        module_id=np.full(30, 2**32 - 1, np.uint32),
        phase=np.ones(30, np.uint8),
        start_ns=np.full(30, -(2**62)),
        end_ns=np.full(30, 2**62),
        depth=np.full(30, 2**32 - 1, np.uint32),
        capture_id="c" * 16,
    )
    worst.new_module_names = ["Net.block." * 20] * 10
    report = pb.StepReport()
    fill_report(report, worst, {"reports_dropped": 2**63, "reconnects": 2**63, "hook_errors": 2**63})
    assert report.ByteSize() <= wire_bytes_bound(worst)
    assert wire_bytes_bound(worst) < 2 * report.ByteSize()  # and not far above it


def test_a_report_the_collector_refuses_is_dropped_alone(tmp_path, transports):
    collector = CollectorThread(tmp_path / "data")
    try:
        port = int(collector.grpc_target.rsplit(":", 1)[1])
        t = transports(port)
        t.identity = Identity(job="j", rank=0, local_rank=0, world_size=1, group_rank=0, host="h", pid=7)
        for step in range(10):
            record = make_record(step)
            if step == 4:
                record.phases["backward"].self_ns[1] = -5  # refused at the edge: negative duration
            t.submit(record)
        t.start()  # all ten in one batch: refused, then replayed without step 4
        wait_for(lambda: t.stats["acked_step"] == 9 and t.stats["unacked"] == 0, 20)
        _, body = get(collector.url, "/api/v1/jobs/j/steps?last=100")
        assert [s["step"] for s in body["steps"]] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
        assert t.counters["reports_dropped"] == 1 and t.counters["reconnects"] == 1
    finally:
        t.close(timeout_s=0.5)
        collector.stop()


class UnreadablePosition:
    """A training thread's position whose every look fails: the heartbeat swallows it and counts."""

    thread_id = 0
    step_start_ns = 0

    def snapshot(self):
        raise RuntimeError("cannot read the position")


def test_heartbeat_errors_travel_with_the_agent_counters_to_metrics_and_the_store(tmp_path, transports):
    collector = CollectorThread(tmp_path / "data")
    try:
        t = transports(int(collector.grpc_target.rsplit(":", 1)[1]))
        t.identity = Identity(job="j", rank=0, local_rank=0, world_size=1, group_rank=0, host="h", pid=7)
        t.heartbeat = Heartbeat(UnreadablePosition(), list)
        t.start()
        sent = iter(range(1000))

        def on_metrics() -> float:
            t.submit(make_record(next(sent)))  # a report at each look: the counters ride on reports
            _, text = get(collector.url, "/metrics")
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            return samples.get(("modtrack_agent_heartbeat_errors_total", (("job", "j"), ("rank", "0"))), 0)

        errors = wait_for(on_metrics, 20, "heartbeat errors on /metrics", interval=0.2)
        assert 0 < errors <= t.heartbeat.errors  # cumulative, as the agent counted them when it sent
        collector.flush_store()
        (rank,) = collector.collector.store.ranks("j")
        assert 0 < rank["heartbeat_errors"] <= t.heartbeat.errors
    finally:
        t.close(timeout_s=0.5)
        collector.stop()


def test_queue_is_bounded_and_drops_are_reported_when_the_link_returns(serve, transports):
    port = free_port()
    t = transports(port, queue_size=50).start()  # nothing listens yet
    started = time.perf_counter()
    for step in range(1000):
        t.submit(make_record(step))
    per_submit = (time.perf_counter() - started) / 1000
    assert per_submit < 200e-6, per_submit  # never waits on the network
    assert t.counters["reports_dropped"] == 950 and t.stats["queued"] == 50

    fake = FakeCollector()
    serve(fake, port)
    wait_for(lambda: len(fake.received) == 50)
    assert fake.received == list(range(950, 1000))
    assert fake.reports[999].counters.reports_dropped == 950
    # Step 0 (which carried the module names) was dropped; the collector learns them anyway.
    told = list(fake.hellos[-1][1].module_names) or list(fake.reports[950].new_module_names)
    assert told == NAMES


def test_replay_after_forced_reconnect_resends_only_unacked(serve, transports):
    fake = FakeCollector()
    _, port = serve(fake)
    t = transports(port).start()
    for step in range(10):
        t.submit(make_record(step))
    wait_for(lambda: t.stats["acked_step"] == 9)
    fake.ack = False  # the collector goes quiet: these stay unacknowledged
    for step in range(10, 15):
        t.submit(make_record(step))
    wait_for(lambda: len(fake.received) == 15)
    fake.ack = True
    fake.drop_streams()
    wait_for(lambda: len(fake.hellos) == 2)
    wait_for(lambda: t.counters["reconnects"] == 1)  # counted at the collector's first answer, after its hello
    for step in range(15, 20):
        t.submit(make_record(step))
    wait_for(lambda: t.stats["acked_step"] == 19)
    counts = {s: fake.received.count(s) for s in range(20)}
    assert all(counts[s] == 1 for s in range(10)), counts  # acked: never re-sent
    assert all(counts[s] == 2 for s in range(10, 15)), counts  # unacked: replayed once
    assert all(counts[s] == 1 for s in range(15, 20)), counts
    assert fake.reports[19].counters.reconnects == 1
    assert t.counters["reconnects"] == 1


def test_replay_buffer_is_bounded(serve, transports):
    fake = FakeCollector(ack=False)
    _, port = serve(fake)
    t = transports(port, replay_size=8, ack_timeout_s=60).start()
    for step in range(20):
        t.submit(make_record(step))
    wait_for(lambda: len(fake.received) == 20)
    assert t.stats["unacked"] == 8 and t.counters["reports_dropped"] == 12


def test_reconnect_backs_off_with_jitter(serve, transports):
    fake = FakeCollector(drop_at_once=True)  # accepts, then drops every stream unanswered
    _, port = serve(fake)
    transports(port, backoff_initial_s=0.05, backoff_max_s=0.4).start()
    wait_for(lambda: len(fake.hellos) >= 7, timeout=15)
    times = [at for at, _ in fake.hellos]
    gaps = np.diff(times)
    assert gaps[0] < 0.3  # first retry soon
    assert gaps[4:].min() > 0.19  # later ones at least half of the 0.4 s cap
    assert gaps.max() < 1.5  # and never beyond the cap (plus scheduling slack)


def test_clock_offset_of_a_shifted_clock(serve, transports):
    fake = FakeCollector()
    _, port = serve(fake)
    shift = 7_000_000_000  # the agent's clock runs 7 s ahead of its perf counter
    t = transports(port, clock=lambda: time.perf_counter_ns() + shift).start()
    wait_for(lambda: len(fake.offsets) >= 1)
    wait_for(lambda: fake.pings >= 5, 10, "the five quick pings at connect")
    true_offset = time.time_ns() - (time.perf_counter_ns() + shift)
    sent = fake.offsets[-1]
    assert abs(sent.offset_ns - true_offset) < 2_000_000, (sent, true_offset)
    assert sent.rtt_ns == min(o.rtt_ns for o in fake.offsets)
    assert abs(t.clock_offset.offset_ns - true_offset) < 2_000_000


def test_controls_capture_pause_resume(serve, transports):
    fake = FakeCollector()
    _, port = serve(fake)
    captures = []
    t = transports(port, on_capture=lambda cid, n: captures.append((cid, n))).start()
    t.submit(make_record(0))
    wait_for(lambda: fake.received == [0])
    fake.send(pb.CollectorMessage(control=pb.Control(capture=pb.CaptureTrace(capture_id="c1", steps=3))))
    wait_for(lambda: captures == [("c1", 3)])
    fake.send(pb.CollectorMessage(control=pb.Control(pause=pb.Pause())))
    wait_for(lambda: t.paused)
    for step in range(1, 4):
        t.submit(make_record(step))
    time.sleep(0.5)  # not a wait for a condition: the window in which a sender that ignored the pause would send
    assert fake.received == [0]  # paused: nothing sent, but kept
    fake.send(pb.CollectorMessage(control=pb.Control(resume=pb.Resume())))
    wait_for(lambda: fake.received == [0, 1, 2, 3])


def test_codec_trace_and_counters():
    rec = make_record(2)
    rec.trace = TraceColumns(
        module_id=np.array([0, 1], np.uint32),
        phase=np.array([0, 1], np.uint8),
        start_ns=np.array([5, 6], np.int64),
        end_ns=np.array([9, 8], np.int64),
        depth=np.array([0, 1], np.uint32),
        capture_id="cap",
    )
    msg = encode_report(rec, {"reports_dropped": 3, "reconnects": 1, "hook_errors": 2, "send_errors": 0})
    r = msg.report
    assert list(r.trace.phase) == [pb.PHASE_FORWARD, pb.PHASE_BACKWARD]
    assert r.trace.capture_id == "cap" and list(r.trace.end_ns) == [9, 8]
    assert (r.counters.reports_dropped, r.counters.hook_errors) == (3, 2)
    assert r.end_ns - r.start_ns == rec.wall_ns


def test_process_with_no_collector_exits_promptly():
    """The sender must never keep a process alive, nor make it wait at exit."""
    port = free_port()
    script = textwrap.dedent(f"""
        import atexit, time
        from modtrack.agent.identity import Identity
        from modtrack.agent.transport import Transport
        from modtrack.agent.step_record import StepRecord
        t = Transport("127.0.0.1:{port}", Identity("j", 0, 0, 1, 0, "h", 1)).start()
        atexit.register(t.close)
        for s in range(100):
            t.submit(StepRecord(step=s, start_ns=0, end_ns=1))
        time.sleep(0.2)
        print("done")
    """)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert out.returncode == 0 and out.stdout == "done\n", out
    assert elapsed < 8, elapsed  # interpreter start + torch-free imports; no connect wait
    assert out.stderr.count("modtrack:") <= 1, out.stderr


def test_backoff_delays_double_up_to_the_cap_and_jitter_only_shortens():
    from itertools import islice

    from modtrack.protos.backoff import backoff_delays

    assert list(islice(backoff_delays(0.5, 3.0), 6)) == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    jittered = list(islice(backoff_delays(0.5, 3.0, jitter=0.5), 2000))
    plain = [0.5, 1.0, 2.0] + [3.0] * 1997
    assert all(p / 2 <= j <= p for j, p in zip(jittered, plain))
    assert len({round(j, 6) for j in jittered[3:]}) > 100  # random, not one fixed share


def test_at_close_the_last_collective_stats_ride_a_copy_of_the_last_report(serve, transports):
    """Collective stats of a rank's last steps are final only at exit (agent/collectives.py `final`): close()
    resends the last report, unchanged but for them, so the collector reads them (and stores nothing new)."""
    from modtrack.agent.collectives import GroupStats

    class Final:
        def attach(self, records):
            pass

        def final(self):
            return [GroupStats(4, "0", "gloo", 2, 42, 1, 0, 0, 8, False, [9], [123], [], 0)]

    fake = FakeCollector()
    _, port = serve(fake)
    t = transports(port).start()
    t.collectives = Final()
    for step in range(5):
        t.submit(make_record(step))
    wait_for(lambda: t.stats["acked_step"] == 4)
    t.close(timeout_s=5)
    assert fake.received == [0, 1, 2, 3, 4, 4]
    last = fake.reports[4]
    assert [(c.step, list(c.seq), list(c.issue_ns)) for c in last.collectives] == [(4, [9], [123])]
    assert last.end_ns == make_record(4).end_ns
