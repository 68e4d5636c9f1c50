"""Test harness for the collector: a real collector on its own loop thread, fake ranks that are
plain gRPC clients sending protobuf messages built here, and an HTTP helper.

Other collector test modules import from here; the tests at the bottom check the harness.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from modtrack.collector.serve import Collector, ServeConfig
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc

MODULES = ["Net", "Net.embed", "Net.blocks.0", "Net.blocks.1", "Net.head"]


class CollectorThread:
    """A real Collector on loopback, port 0, running on its own event loop thread."""

    def __init__(self, data_dir, **config):
        config.setdefault("watermark_s", 0.5)
        self.config = ServeConfig(grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0",
                                  data_dir=str(data_dir), **config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.collector = Collector(self.config)
        asyncio.run_coroutine_threadsafe(self.collector.start(), self.loop).result(30)
        self.grpc_target = f"127.0.0.1:{self.collector.grpc_port}"
        self.url = f"http://127.0.0.1:{self.collector.http_port}"

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.collector.stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def collector(tmp_path):
    c = CollectorThread(tmp_path / "data")
    try:
        yield c
    finally:
        c.stop()


def phase(pid: int, self_ms: list[float], ids: list[int] | None = None) -> pb.PhaseStats:
    ids = list(range(len(self_ms))) if ids is None else ids
    ns = [int(ms * 1e6) for ms in self_ms]
    return pb.PhaseStats(phase=pid, module_id=ids, calls=[1] * len(ids), inclusive_ns=ns,
                         self_ns=ns, first_start_ns=[1000] * len(ids),
                         last_end_ns=[1000 + n for n in ns])


def report(step: int, fwd_ms: list[float], bwd_ms: list[float] | None = None, wall_ms: float = 100.0,
           sync_ms: float = 1.0, start_ns: int | None = None, **fields) -> pb.StepReport:
    bwd_ms = fwd_ms if bwd_ms is None else bwd_ms
    start = step * 1_000_000_000 if start_ns is None else start_ns
    r = pb.StepReport(step=step, start_ns=start, end_ns=start + int(wall_ms * 1e6),
                      forward_ns=int(sum(fwd_ms) * 1e6), backward_ns=int(sum(bwd_ms) * 1e6),
                      backward_tail_ns=int(sync_ms * 1e6), **fields)
    r.phases.append(phase(pb.PHASE_FORWARD, fwd_ms))
    r.phases.append(phase(pb.PHASE_BACKWARD, bwd_ms))
    return r


class FakeRank:
    """One rank's stream: messages go in through a queue, answers are collected by a thread."""

    def __init__(self, target: str, job: str, rank: int, world_size: int, host: str | None = None,
                 modules=MODULES, token: str | None = None, session: str = "s", hello=True):
        self.channel = grpc.insecure_channel(target)
        self.outgoing: queue.Queue = queue.Queue()
        self.acks: list[int] = []
        self.pongs: list = []
        self.controls: list = []
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        metadata = [("authorization", f"Bearer {token}")] if token else None
        self.responses = pb_grpc.CollectorStub(self.channel).Stream(
            iter(self.outgoing.get, None), metadata=metadata)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if hello:
            self.send(pb.AgentMessage(hello=pb.Hello(
                protocol_version=1, job=job, rank=rank, world_size=world_size,
                host=host or f"host{rank}", pid=1000 + rank, module_names=list(modules),
                session=session, clock_kind=pb.CLOCK_KIND_CPU)))

    def _read(self) -> None:
        try:
            for msg in self.responses:
                kind = msg.WhichOneof("body")
                if kind == "ack":
                    self.acks.append(msg.ack.step)
                elif kind == "pong":
                    self.pongs.append((msg.pong, time.time_ns()))  # with its arrival time
                else:
                    self.controls.append(msg.control)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    def send(self, msg: pb.AgentMessage) -> None:
        self.outgoing.put(msg)

    def report(self, rep: pb.StepReport) -> None:
        self.send(pb.AgentMessage(report=rep))

    def wait_ack(self, step: int, timeout: float = 10.0) -> None:
        wait_for(lambda: self.acks and self.acks[-1] >= step, timeout,
                 lambda: f"no ack for step {step}: acks {self.acks[-3:]} error {self.error}")

    def wait_done(self, timeout: float = 10.0) -> None:
        assert self.done.wait(timeout), "stream did not end"

    def close(self) -> None:
        """Half-close (all sent), wait for the stream to end, drop the channel."""
        self.outgoing.put(None)
        self.done.wait(10)
        self.channel.close()

    def kill(self) -> None:
        """Drop the connection without a goodbye, as a crashed or partitioned agent would."""
        self.responses.cancel()
        self.channel.close()


def wait_for(predicate, timeout: float = 10.0, message=lambda: "timed out") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(message())


def get(url: str, path: str, token: str | None = None, method: str = "GET") -> tuple[int, dict]:
    """(status, JSON body, or text for other content types)."""
    req = urllib.request.Request(url + path, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
            return resp.status, (json.loads(body) if resp.headers.get_content_type()
                                 == "application/json" else body.decode())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post(url: str, path: str, token: str | None = None) -> tuple[int, dict]:
    return get(url, path, token, method="POST")


def stream_steps(ranks: list[FakeRank], steps, fwd_ms_of=lambda rank, step: [1.0, 2.0, 3.0, 4.0, 5.0],
                 **kw) -> None:
    for step in steps:
        for i, r in enumerate(ranks):
            r.report(report(step, fwd_ms_of(i, step), **kw))
    for r in ranks:
        r.wait_ack(steps[-1])


def test_reports_are_acked_and_queryable(collector):
    ranks = [FakeRank(collector.grpc_target, "job-a", i, 2) for i in range(2)]
    try:
        stream_steps(ranks, range(3))
        status, body = get(collector.url, "/api/v1/jobs/job-a/steps?last=10")
        assert status == 200
        assert [s["step"] for s in body["steps"]] == [0, 1, 2]
        assert [r["rank"] for r in body["steps"][0]["ranks"]] == [0, 1]
        assert body["steps"][0]["ranks"][1]["host"] == "host1"
        assert body["steps"][0]["ranks"][0]["wall_ms"] == pytest.approx(100.0)
        assert body["steps"][0]["ranks"][0]["forward_ms"] == pytest.approx(15.0)
        assert body["steps"][0]["ranks"][0]["sync_wait_ms"] == pytest.approx(1.0)
    finally:
        for r in ranks:
            r.close()
    assert all(r.error is None for r in ranks)
