"""Bad input at the edge: every malformed or hostile message gets a clear gRPC status, the
collector keeps serving everyone else, and nothing already stored changes."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.collector_thread import CollectorThread
from harness.fake_rank import MODULES, FakeRank, batch, report, stream_steps
from harness.http import get
from harness.waiting import wait_for
from modtrack.collector.ingest import edge_limits
from modtrack.protos import modtrack_pb2 as pb

STREAM = "/modtrack.v1.Collector/Stream"
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def refused(rank: FakeRank, timeout: float = 20) -> grpc.RpcError:
    rank.wait_done(timeout)
    assert rank.error is not None, f"the stream should have been refused (acks {rank.acks})"
    return rank.error


def hello(**fields) -> pb.AgentMessage:
    base = dict(protocol_version=1, job="j", rank=0, world_size=1, host="h", module_names=MODULES, session="s")
    return pb.AgentMessage(hello=pb.Hello(**{**base, **fields}))


def long_module_call() -> pb.StepReport:
    rep = report(3, [1.0] * 5)
    rep.phases[0].inclusive_ns[1] = 25 * 3600 * 10**9
    return rep


@pytest.mark.parametrize(
    "first, then, code, words",
    [
        (hello(world_size=10**9), None, "INVALID_ARGUMENT", "world_size 1000000000 is over the limit"),
        (hello(module_names=[f"m{i}" for i in range(10**6)]), None, "RESOURCE_EXHAUSTED", "1000000 module names"),
        (hello(module_names=["x" * 5000]), None, "INVALID_ARGUMENT", "longer than 1000 characters"),
        (hello(job="evil\njob"), None, "INVALID_ARGUMENT", "job must be at most"),
        (hello(), report(2**60, [1.0] * 5, start_ns=0), "INVALID_ARGUMENT", "over the limit of 2^53"),
        (hello(), report(3, [1.0] * 5, optimizer_ns=2**62), "INVALID_ARGUMENT", "more than a day"),
        (hello(), report(3, [1.0] * 5, gc_ns=2**62), "INVALID_ARGUMENT", f"gc_ns {2**62} is more than a day"),
        (hello(), report(3, [1.0] * 5, start_ns=-(2**63) + 5), "INVALID_ARGUMENT", "out of range"),
        (hello(), long_module_call(), "INVALID_ARGUMENT", "ns is more than a day"),
        (hello(), pb.AgentMessage(clock=pb.ClockOffset(offset_ns=2**63 - 1)), "INVALID_ARGUMENT", "clock offset"),
        (hello(), pb.AgentMessage(), "INVALID_ARGUMENT", "an empty AgentMessage"),
        (
            hello(),
            batch([report(2, [1.0] * 5), long_module_call()]),
            "INVALID_ARGUMENT",
            "step 3 phase forward: a duration",
        ),
        (
            hello(),
            batch([report(2, [1.0] * 5), report(2**60, [1.0] * 5, start_ns=0)]),
            "INVALID_ARGUMENT",
            "over the limit of 2^53",
        ),
    ],
)
def test_each_bad_message_gets_a_clear_status(collector, first, then, code, words):
    good = FakeRank(collector.grpc_target, "j", 0, 2)
    bad = FakeRank(collector.grpc_target, "j", 1, 2, hello=False)
    try:
        stream_steps([good], [0, 1])
        bad.send(first)
        if then is not None:
            bad.send(then if isinstance(then, pb.AgentMessage) else pb.AgentMessage(report=then))
        err = refused(bad)
        assert err.code().name == code and words in err.details(), err.details()
        stream_steps([good], [2, 3])  # everyone else goes on
        assert good.error is None
    finally:
        good.close()
        bad.kill()


def test_steps_far_ahead_of_the_job_are_refused(collector):
    rank = FakeRank(collector.grpc_target, "j", 0, 1)
    try:
        stream_steps([rank], [0, 1, 2])
        rank.report(report(2 + edge_limits.MAX_STEPS_AHEAD + 1, [1.0] * 5))
        assert "steps ahead of step 2" in refused(rank).details()
    finally:
        rank.kill()
    again = FakeRank(collector.grpc_target, "j", 0, 1)
    try:
        stream_steps([again], [3, 4])  # the job's watermark did not move
        assert collector.collector.merger.jobs["j"].last_evaluated <= 4
    finally:
        again.close()


def module_rows(path, job: str) -> list[int]:
    """The steps of a job whose rows still hold per-module figures."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT DISTINCT step FROM steps WHERE job = ? AND m_module IS NOT NULL ORDER BY step", (job,)
        )
        return [r[0] for r in rows]
    finally:
        conn.close()


def test_one_ranks_report_far_ahead_does_not_age_the_jobs_module_figures(tmp_path):
    """Retention keeps the newest retain_steps steps' module figures, counted from the job's last evaluated step:
    a report far ahead (valid at the edge) from one rank is never evaluated, and ages nothing."""
    c = CollectorThread(tmp_path / "data", retain_steps=5, retention_every_s=0.1)
    try:
        ranks = [FakeRank(c.grpc_target, "kept", r, 2) for r in range(2)]
        stream_steps(ranks, range(12))
        ranks[1].report(report(11 + edge_limits.MAX_STEPS_AHEAD // 2, [1.0] * 5))
        ranks[1].wait_ack(11 + edge_limits.MAX_STEPS_AHEAD // 2)
        # the job evaluated up to step 10 or 11: steps before the newest 5 lose their module figures, no more
        wait_for(lambda: module_rows(c.collector.store.path, "kept")[:2] in ([6, 7], [7, 8]), what="retention ran")
        steps = module_rows(c.collector.store.path, "kept")
        assert steps[-1] == 11 + edge_limits.MAX_STEPS_AHEAD // 2 and 11 in steps, steps
        for r in ranks:
            r.close()
    finally:
        c.stop()


def test_garbage_bytes_and_silent_streams(tmp_path):
    c = CollectorThread(tmp_path / "data", hello_timeout_s=0.5)
    try:
        channel = grpc.insecure_channel(c.grpc_target)
        raw = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            list(raw(iter([b"\xff\xfe\xfd not a protobuf \x00\x01"]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "undecodable message" in err.value.details()
        channel.close()

        with socket.create_connection(("127.0.0.1", c.collector.grpc_port), timeout=5) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(range(256)) * 16)  # raw frames
            s.recv(100)

        started = time.monotonic()
        silent = FakeRank(c.grpc_target, "j", 0, 1, hello=False)
        assert refused(silent, 10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 8
        silent.kill()

        ok = FakeRank(c.grpc_target, "j", 0, 1)
        stream_steps([ok], [0, 1])
        ok.close()
    finally:
        c.stop()


async def _flood(target: str, streams: int, channels: int = 8) -> dict:
    """Open `streams` streams at once that never say hello; count how each one ends."""
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]

    async def one(i: int):
        call = chans[i % channels].stream_stream(STREAM)(timeout=30)
        try:
            async for _ in call:
                pass
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    try:
        ends = await asyncio.gather(*(one(i) for i in range(streams)))
    finally:
        for ch in chans:
            await ch.close()
    counts: dict = {}
    for e in ends:
        counts[e] = counts.get(e, 0) + 1
    return counts


def test_thousands_of_streams_at_once_are_bounded(tmp_path):
    c = CollectorThread(tmp_path / "data", max_streams=64, hello_timeout_s=2.0)
    try:
        counts = asyncio.run(_flood(c.grpc_target, 2000))
        # At most max_streams were let in (and closed for saying nothing); the rest were
        # refused at once (a few end as CANCELLED when the refusal races the client's open).
        assert counts.get("DEADLINE_EXCEEDED", 0) <= 64, counts
        assert counts.get("RESOURCE_EXHAUSTED", 0) >= 1500, counts
        assert set(counts) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}, counts
        assert get(c.url, "/healthz")[0] == 200
        ok = FakeRank(c.grpc_target, "j", 0, 1)  # the idle ones were closed: room again
        stream_steps([ok], [0, 1])
        ok.close()
    finally:
        c.stop()


# --- property-based: malformed reports never change what is stored -------------------------

TABLES = {
    "steps": "job, attempt, rank, step",
    "modules": "job, module_id",
    "traces": "job, attempt, rank, step",
    "jobs": "job",
}


def snapshot(path) -> dict:
    conn = sqlite3.connect(path)
    try:
        out = {}
        for table, key in TABLES.items():
            cols = "job, world_size" if table == "jobs" else "*"
            rows = conn.execute(f"SELECT {cols} FROM {table} ORDER BY {key}").fetchall()
            out[table] = {row[: len(key.split(","))]: row for row in rows}
        return out
    finally:
        conn.close()


int64 = st.integers(-(2**63), 2**63 - 1)
uint32 = st.integers(0, 2**32 - 1)
COLUMNS = ("module_id", "calls", "inclusive_ns", "self_ns", "first_start_ns", "last_end_ns")


@st.composite
def malformed(draw):
    """A report for an already stored step, broken in one or two of many ways."""
    rep = report(draw(st.integers(0, 9)), [1.0, 2.0, 3.0, 4.0, 5.0])
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(
            st.sampled_from(["drop", "module_id", "duration", "figure", "step", "names", "phase", "trace", "stamp"])
        )
        ph = rep.phases[draw(st.integers(0, 1))]
        col = draw(st.sampled_from(COLUMNS))
        if kind == "drop":
            del getattr(ph, col)[draw(st.integers(0, 4))]
        elif kind == "module_id":
            ph.module_id[draw(st.integers(0, 4))] = draw(uint32)
        elif kind in ("duration", "stamp"):
            name = draw(st.sampled_from(COLUMNS[2:4] if kind == "duration" else COLUMNS[4:]))
            getattr(ph, name)[draw(st.integers(0, 4))] = draw(int64)
        elif kind == "figure":
            setattr(
                rep,
                draw(
                    st.sampled_from(["start_ns", "end_ns", "forward_ns", "backward_ns", "data_ns", "backward_tail_ns"])
                ),
                draw(int64),
            )
        elif kind == "step":
            rep.step = draw(st.integers(0, 2**64 - 1))
        elif kind == "names":
            rep.first_new_module_id = draw(st.integers(0, 2**32 - 1))
            rep.new_module_names.extend(draw(st.lists(st.text(max_size=5), max_size=3)))
        elif kind == "phase":
            ph.phase = draw(st.integers(0, 2**31 - 1))
        elif kind == "trace":
            n = draw(st.integers(0, 3))
            rep.trace.module_id.extend(draw(st.lists(uint32, min_size=n, max_size=n)))
            rep.trace.start_ns.extend(draw(st.lists(int64, max_size=3)))
            rep.trace.end_ns.extend(draw(st.lists(int64, max_size=3)))
            rep.trace.phase.extend(draw(st.lists(st.integers(0, 3), max_size=3)))
            rep.trace.depth.extend(draw(st.lists(uint32, max_size=3)))
    return rep


@pytest.mark.slow
def test_malformed_reports_never_change_stored_rows(tmp_path):
    c = CollectorThread(tmp_path / "data")
    try:
        ranks = [FakeRank(c.grpc_target, "victim", r, 2) for r in range(2)]
        stream_steps(ranks, range(10))
        for r in ranks:
            r.close()
        c.flush_store()
        before = snapshot(c.collector.store.path)
        outcomes = {}

        @settings(
            max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(rep=malformed())
        def barrage(rep):
            bad = FakeRank(c.grpc_target, "victim", 1, 2)
            try:
                bad.report(rep)
                bad.close()
                assert bad.done.is_set()
                if bad.error is not None:
                    assert bad.error.code() in CLEAR, (bad.error.code(), bad.error.details())
                outcome = bad.error.code().name if bad.error else "stored"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            finally:
                bad.kill()

        barrage()
        c.flush_store()  # whatever the barrage got stored is committed
        after = snapshot(c.collector.store.path)
        for table, rows in before.items():
            for key, row in rows.items():
                assert after[table].get(key) == row, (table, key)
        print("outcomes", outcomes)
        assert outcomes.get("INVALID_ARGUMENT", 0) > 40, outcomes
        good = FakeRank(c.grpc_target, "victim", 0, 2)  # still serving
        stream_steps([good], [10])
        good.close()
    finally:
        c.stop()
