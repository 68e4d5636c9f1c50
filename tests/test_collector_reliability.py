"""The collector under the conditions a long-lived one meets: a rank joining while a step is being
evaluated, failures counted where Prometheus reads them, finished jobs leaving memory but not SQLite,
and a data directory written by the previous schema.

Helpers are local to this file until the shared test harness lands.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import urllib.request

import grpc
import pytest

from modtrack.collector.pipeline.merge import RankState
from modtrack.collector.serve import Collector, ServeConfig
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc

MODULES = ["Net", "Net.a", "Net.b"]


class CollectorThread:
    """A real Collector on loopback ports, on its own event loop thread."""

    def __init__(self, data_dir, **config):
        self.config = ServeConfig(grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0", data_dir=str(data_dir), **config)
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


class Rank:
    """One agent's stream as plain gRPC: a Hello, then whatever is sent; acks are collected."""

    def __init__(self, target: str, job: str, rank: int, world_size: int, clock_kind=pb.CLOCK_KIND_CPU):
        self.channel = grpc.insecure_channel(target)
        self.outgoing: queue.Queue = queue.Queue()
        self.acks: list[int] = []
        self.responses = pb_grpc.CollectorStub(self.channel).Stream(iter(self.outgoing.get, None))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        hello = pb.Hello(
            protocol_version=1, job=job, rank=rank, world_size=world_size, host=f"host{rank}", pid=1000 + rank,
            module_names=MODULES, session="s", clock_kind=clock_kind,
        )
        self.outgoing.put(pb.AgentMessage(hello=hello))

    def _read(self) -> None:
        try:
            for msg in self.responses:
                if msg.WhichOneof("body") == "ack":
                    self.acks.append(msg.ack.step)
        except grpc.RpcError:
            pass

    def report(self, step: int, self_ms=(1.0, 2.0, 3.0)) -> None:
        ns = [int(ms * 1e6) for ms in self_ms]
        rep = pb.StepReport(step=step, start_ns=step * 10**9, end_ns=step * 10**9 + 100_000_000)
        for phase in (pb.PHASE_FORWARD, pb.PHASE_BACKWARD):
            rep.phases.append(pb.PhaseStats(
                phase=phase, module_id=range(len(ns)), calls=[1] * len(ns), inclusive_ns=ns, self_ns=ns,
                first_start_ns=[1000] * len(ns), last_end_ns=[1000 + n for n in ns],
            ))
        self.outgoing.put(pb.AgentMessage(report=rep))

    def close(self) -> None:
        self.outgoing.put(None)
        self.reader.join(10)
        self.channel.close()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def job_row(url: str, job: str) -> dict:
    return next((j for j in get_json(f"{url}/api/v1/jobs")["jobs"] if j["job"] == job), {})


@pytest.fixture
def served(tmp_path):
    c = CollectorThread(tmp_path / "data", watermark_s=0.3)
    try:
        yield c
    finally:
        c.stop()


def test_a_hello_during_the_first_evaluation_loses_no_verdict(served, monkeypatch):
    """Rank 1 says Hello while the evaluation thread works on step 0 of rank 0 (forced: the
    evaluation thread waits inside the step until the Hello is in). The step is still evaluated,
    and no evaluation error is counted."""
    from modtrack.collector.pipeline import detector as detector_module

    c = served.collector
    joined = threading.Event()
    late: list[Rank] = []

    def hello_now():
        """On the evaluation thread, once: rank 1 connects and the loop takes its Hello."""
        if joined.is_set() or threading.current_thread() is served.thread:
            return
        joined.set()
        late.append(Rank(served.grpc_target, "race", 1, 2))
        wait_for(lambda: 1 in c.merger.jobs["race"].ranks, what="rank 1's Hello")

    class HookedRank(RankState):
        """Rank 0's state: the first read of its clock kind off the loop thread lets rank 1 in."""

        def __getattribute__(self, name):
            if name == "clock_kind":
                hello_now()
            return super().__getattribute__(name)

    observe = detector_module.Detector.observe

    def hooked_observe(self, matrix):
        hello_now()  # an evaluation that reads no rank state still sees the Hello arrive mid-step
        return observe(self, matrix)

    monkeypatch.setattr(detector_module.Detector, "observe", hooked_observe)
    rank0 = Rank(served.grpc_target, "race", 0, 2, clock_kind=pb.CLOCK_KIND_CUDA)  # so no look at ranks stops early
    try:
        wait_for(lambda: "race" in c.merger.jobs and 0 in c.merger.jobs["race"].ranks, what="rank 0's Hello")
        c.merger.jobs["race"].ranks[0].__class__ = HookedRank
        rank0.report(0)  # world size 2 with one rank known: evaluated at the watermark
        wait_for(lambda: job_row(served.url, "race").get("last_evaluated_step") is not None or c.eval_errors,
                 what="step 0's evaluation")
        assert joined.is_set(), "the Hello was not forced into the evaluation"
        assert c.eval_errors == 0
        assert job_row(served.url, "race")["last_evaluated_step"] == 0
    finally:
        rank0.close()
        for r in late:
            r.close()
