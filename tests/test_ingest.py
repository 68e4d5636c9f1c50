"""gRPC ingest over real loopback: validation at the edge, acks, clock sync, replay, controls."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import urllib.request

import grpc
import pytest

from harness.collector_thread import CollectorThread
from harness.fake_rank import FakeRank, batch, report, stream_steps
from harness.http import get, post
from harness.waiting import wait_for
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc


def rejected(rank: FakeRank) -> grpc.RpcError:
    rank.wait_done()
    assert rank.error is not None, "the stream should have been aborted"
    return rank.error


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.phases[0].self_ns.pop(), "self_ns has 4 entries, module_id has 5"),
        (lambda r: r.phases[1].module_id.__setitem__(0, 99), "module id 99 is outside the rank's table of 5"),
        (lambda r: r.phases[0].inclusive_ns.__setitem__(2, -5), "negative duration"),
        (lambda r: setattr(r, "backward_tail_ns", -1), "negative duration backward_tail_ns"),
        (lambda r: setattr(r, "end_ns", r.start_ns - 1), "is before start_ns"),
        (lambda r: setattr(r, "gc_ns", -1), "negative duration gc_ns=-1"),
        (lambda r: setattr(r, "gc_ns", r.end_ns - r.start_ns + 1), "gc_ns 100000001 is longer than the step itself"),
        (
            lambda r: setattr(r, "first_new_module_id", 7) or r.new_module_names.append("X"),
            "new module names start at id 7",
        ),
    ],
)
def test_bad_report_aborts_only_its_stream(collector, mutate, message):
    good = FakeRank(collector.grpc_target, "j", 0, 2)
    bad = FakeRank(collector.grpc_target, "j", 1, 2)
    try:
        stream_steps([good, bad], [0])
        broken = report(1, [1.0] * 5)
        mutate(broken)
        bad.report(broken)
        err = rejected(bad)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.details()
        stream_steps([good], [1, 2])  # the other rank keeps streaming
        assert good.error is None
        _, body = get(collector.url, "/api/v1/jobs/j/steps?last=10")
        assert [(s["step"], [r["rank"] for r in s["ranks"]]) for s in body["steps"]] == [
            (0, [0, 1]),
            (1, [0]),
            (2, [0]),
        ]  # nothing from the bad report was stored
    finally:
        good.close()
        bad.kill()


def test_report_before_hello_is_refused(collector):
    rank = FakeRank(collector.grpc_target, "j", 0, 1, hello=False)
    try:
        rank.report(report(0, [1.0]))
        err = rejected(rank)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "first message must be a Hello" in err.details()
    finally:
        rank.kill()


def test_hello_with_rank_outside_world_is_refused(collector):
    rank = FakeRank(collector.grpc_target, "j", 4, 4)
    try:
        err = rejected(rank)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "rank 4 is outside world_size 4" in err.details()
    finally:
        rank.kill()


def test_wrong_token_is_unauthenticated(tmp_path):
    c = CollectorThread(tmp_path / "data", token="s3cret")
    ranks = []
    try:
        for token in (None, "wrong"):
            ranks.append(FakeRank(c.grpc_target, "j", 0, 1, token=token))
            assert rejected(ranks[-1]).code() == grpc.StatusCode.UNAUTHENTICATED
        ok = FakeRank(c.grpc_target, "j", 0, 1, token="s3cret")
        ranks.append(ok)
        stream_steps([ok], [0, 1])
        assert ok.error is None
    finally:
        for r in ranks:
            r.kill()
        c.stop()


def test_replay_after_forced_reconnect_adds_no_duplicates(collector):
    first = FakeRank(collector.grpc_target, "j", 0, 1, session="a")
    stream_steps([first], range(5))
    first.kill()  # the link drops; the agent replays everything it thinks may be lost
    again = FakeRank(collector.grpc_target, "j", 0, 1, session="a")
    try:
        # The replay carries other figures: had it been stored, the wall times would change.
        stream_steps([again], range(3, 8), wall_ms=999.0)
        _, body = get(collector.url, "/api/v1/jobs/j/steps?last=100")
        steps = body["steps"]
        assert [s["step"] for s in steps] == list(range(8))
        assert all(len(s["ranks"]) == 1 for s in steps)
        assert [s["ranks"][0]["wall_ms"] for s in steps] == [100.0] * 5 + [999.0] * 3
        assert again.acks[-1] == 7
    finally:
        again.close()


def test_acks_are_cumulative_and_follow_the_commit(collector):
    rank = FakeRank(collector.grpc_target, "j", 0, 1)
    try:
        for step in range(50):
            rank.report(report(step, [1.0] * 5))
        rank.wait_ack(49)
        assert rank.acks == sorted(rank.acks)
        assert len(rank.acks) < 50  # batched: one ack per commit, not one per report
        # Everything acked is readable right away.
        _, body = get(collector.url, "/api/v1/jobs/j/steps?last=100")
        assert len(body["steps"]) == 50
    finally:
        rank.close()


def _stored(collector, job="j") -> list[tuple[int, float]]:
    """(step, wall ms) of every stored step of rank 0, from the API."""
    _, body = get(collector.url, f"/api/v1/jobs/{job}/steps?last=1000")
    return [(s["step"], s["ranks"][0]["wall_ms"]) for s in body["steps"]]


def test_a_batch_is_stored_in_one_write_and_acked_once(collector):
    rank = FakeRank(collector.grpc_target, "j", 0, 1)
    try:
        rank.reports([report(step, [1.0] * 5, wall_ms=100.0 + step) for step in range(10)])
        rank.wait_ack(9)
        assert rank.acks == [9]  # one ack, for the whole batch, after its commit
        assert _stored(collector) == [(step, 100.0 + step) for step in range(10)]
        rank.report(report(10, [1.0] * 5))  # the single-report message of older agents still works
        rank.reports([report(11, [1.0] * 5), report(12, [1.0] * 5)])
        rank.wait_ack(12)
        assert [s for s, _ in _stored(collector)] == list(range(13))
        assert rank.error is None
    finally:
        rank.close()


def test_a_bad_report_in_a_batch_refuses_the_batch_and_names_its_step(collector):
    rank = FakeRank(collector.grpc_target, "j", 0, 1)
    try:
        stream_steps([rank], [0, 1])
        broken = report(3, [1.0] * 5)
        broken.phases[1].self_ns[2] = -7
        rank.reports([report(2, [1.0] * 5), broken, report(4, [1.0] * 5)])
        err = rejected(rank)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "step 3" in err.details() and "negative duration" in err.details(), err.details()
        assert ("modtrack-refused-step", "3") in tuple(err.trailing_metadata())
        collector.flush_store()
        assert [s for s, _ in _stored(collector)] == [0, 1]  # nothing of the batch; everything before it
    finally:
        rank.kill()
    again = FakeRank(collector.grpc_target, "j", 0, 1)
    try:  # the agent replays the batch without the refused step
        again.reports([report(2, [1.0] * 5), report(4, [1.0] * 5)])
        again.wait_ack(4)
        assert [s for s, _ in _stored(collector)] == [0, 1, 2, 4]
    finally:
        again.close()


def test_duplicates_inside_and_across_batches_are_refused_and_counted(collector):
    rank = FakeRank(collector.grpc_target, "j", 0, 1)
    try:
        rank.reports([report(0, [1.0] * 5), report(1, [1.0] * 5), report(1, [1.0] * 5, wall_ms=555.0)])
        rank.wait_ack(1)
        rank.reports([report(1, [1.0] * 5), report(2, [1.0] * 5, wall_ms=666.0)])  # a replayed step 1: ignored
        rank.wait_ack(2)
        rank.reports([report(2, [1.0] * 5, wall_ms=777.0), report(3, [1.0] * 5)])
        rank.wait_ack(3)
        collector.flush_store()
        assert _stored(collector) == [(0, 100.0), (1, 100.0), (2, 666.0), (3, 100.0)]  # the first one stored wins
        # a different report under a stored key is a conflict (a replay of the same one is not)
        assert collector.collector.store.duplicates == {"j": 2}
        assert rank.error is None
    finally:
        rank.close()


@pytest.mark.parametrize(
    "reports, code, words",
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT, "an empty StepReportBatch"),
        (
            [report(step, [1.0]) for step in range(1025)],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "1025 reports, over the limit of 1024",
        ),
    ],
)
def test_batches_out_of_bounds_are_refused(collector, reports, code, words):
    rank = FakeRank(collector.grpc_target, "j", 0, 1)
    try:
        stream_steps([rank], [0])
        rank.send(batch(reports))
        err = rejected(rank)
        assert err.code() == code and words in err.details(), err.details()
        assert [s for s, _ in _stored(collector)] == [0]
    finally:
        rank.kill()


def test_clock_offset_of_a_shifted_rank(collector):
    """A rank whose clock runs 5 s behind measures its offset from our pongs within a ms."""
    shift_ns = -5_000_000_000
    rank = FakeRank(collector.grpc_target, "j", 0, 1)
    try:
        samples = []  # (rtt, offset), NTP-style; keep the minimum-RTT one
        for _ in range(5):
            t1 = time.time_ns() + shift_ns
            rank.send(pb.AgentMessage(ping=pb.ClockPing(t1_ns=t1)))
            wait_for(lambda: len(rank.pongs) > len(samples), 10, "the pong")
            pong, arrived_ns = rank.pongs[-1]
            t4 = arrived_ns + shift_ns
            assert pong.t1_ns == t1 and t1 - shift_ns <= pong.t2_ns <= pong.t3_ns <= arrived_ns
            samples.append(((t4 - t1) - (pong.t3_ns - pong.t2_ns), ((pong.t2_ns - t1) + (pong.t3_ns - t4)) // 2))
        rtt, offset = min(samples)
        rank.send(pb.AgentMessage(clock=pb.ClockOffset(offset_ns=offset, rtt_ns=rtt)))
        stream_steps([rank], [0])
        clocks = collector.collector.store.rank_clocks("j")
        assert abs(clocks[0]["clock_offset_ns"] - 5_000_000_000) < 1_000_000
        assert clocks[0]["host"] == "host0" and clocks[0]["rtt_ns"] == rtt
    finally:
        rank.close()


def test_capture_request_reaches_ranks_and_traces_are_stored(collector):
    ranks = [FakeRank(collector.grpc_target, "j", i, 2) for i in range(2)]
    try:
        stream_steps(ranks, [0])
        status, body = post(collector.url, "/api/v1/jobs/j/capture?steps=2")
        assert status == 200 and body["ranks"] == 2
        for r in ranks:
            wait_for(lambda r=r: r.controls, 10, "the capture request")
            assert r.controls[0].capture.capture_id == body["capture_id"]
            assert r.controls[0].capture.steps == 2
        for r in ranks:
            rep = report(1, [1.0] * 5)
            rep.trace.CopyFrom(
                pb.Trace(
                    module_id=[0, 4],
                    phase=[1, 2],
                    start_ns=[10, 30],
                    end_ns=[20, 45],
                    depth=[0, 1],
                    capture_id=body["capture_id"],
                )
            )
            r.report(rep)
            r.wait_ack(1)
        calls = collector.collector.store.trace_calls("j", 0, 5)
        assert sorted(calls) == [0, 1]
        chunk = calls[1][0]
        assert chunk["step"] == 1 and chunk["capture_id"] == body["capture_id"]
        assert chunk["module"].tolist() == [0, 4] and chunk["end"].tolist() == [20, 45]
        assert post(collector.url, "/api/v1/jobs/nope/capture")[0] == 404
        assert post(collector.url, "/api/v1/jobs/j/pause")[1]["ranks"] == 2
        assert post(collector.url, "/api/v1/jobs/j/resume")[1]["ranks"] == 2
        for r in ranks:
            wait_for(lambda r=r: len(r.controls) == 3, 10, "capture, pause and resume")
            assert [c.WhichOneof("action") for c in r.controls] == ["capture", "pause", "resume"]
    finally:
        for r in ranks:
            r.close()


def test_new_module_names_extend_the_table_job_wide(collector):
    """Rank 1 learns the modules in another order: the job-wide ids still line up by name."""
    a = FakeRank(collector.grpc_target, "j", 0, 2, modules=["Net", "Net.a"])
    b = FakeRank(collector.grpc_target, "j", 1, 2, modules=["Net.b", "Net"])
    try:
        ra = report(0, [1.0, 2.0, 3.0], first_new_module_id=2, new_module_names=["Net.b"])
        rb = report(0, [4.0, 5.0, 6.0], first_new_module_id=2, new_module_names=["Net.a"])
        a.report(ra)
        b.report(rb)
        a.wait_ack(0)
        b.wait_ack(0)
        wait_for(lambda: get(collector.url, "/api/v1/jobs/j/modules?step=0")[0] == 200, 10, "step 0's modules")
        _, body = get(collector.url, "/api/v1/jobs/j/modules?step=0")
        fwd = {m["module"]: m["ms_by_rank"] for m in body["modules"] if m["phase"] == "forward"}
        assert fwd == {"Net": {"0": 1.0, "1": 5.0}, "Net.a": {"0": 2.0, "1": 6.0}, "Net.b": {"0": 3.0, "1": 4.0}}
    finally:
        a.close()
        b.close()


def test_oversized_message_is_refused_and_others_keep_streaming(collector):
    good = FakeRank(collector.grpc_target, "j", 0, 2)
    huge = FakeRank(collector.grpc_target, "j", 1, 2)
    try:
        stream_steps([good, huge], [0])
        huge.report(
            report(1, [1.0] * 5, first_new_module_id=5, new_module_names=["x" * (17 * 1024 * 1024)])
        )  # over the 16 MiB limit
        assert rejected(huge).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stream_steps([good], [1, 2])
        assert good.error is None
    finally:
        good.close()
        huge.kill()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_for_grpc_and_http(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    c = CollectorThread(tmp_path / "data", tls_cert=str(cert), tls_key=str(key))
    try:
        channel = grpc.secure_channel(c.grpc_target, grpc.ssl_channel_credentials(cert.read_bytes()))
        stub = pb_grpc.CollectorStub(channel)
        hello = pb.AgentMessage(
            hello=pb.Hello(protocol_version=1, job="tls", rank=0, world_size=1, host="h", module_names=["Net"])
        )
        answers = list(stub.Stream(iter([hello, pb.AgentMessage(report=report(0, [1.0]))]), timeout=20))
        assert [a.ack.step for a in answers if a.HasField("ack")] == [0]
        channel.close()
        ctx = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(c.url.replace("http:", "https:") + "/api/v1/jobs", context=ctx, timeout=10) as resp:
            assert json.load(resp)["jobs"][0]["job"] == "tls"
    finally:
        c.stop()
