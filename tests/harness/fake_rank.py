"""Fake ranks: plain gRPC clients that stream protobuf messages built here, as an agent would."""

from __future__ import annotations

import queue
import threading
import time

import grpc

from harness.waiting import wait_for
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc

MODULES = ["Net", "Net.embed", "Net.blocks.0", "Net.blocks.1", "Net.head"]


def phase(pid: int, self_ms: list[float], ids: list[int] | None = None) -> pb.PhaseStats:
    ids = list(range(len(self_ms))) if ids is None else ids
    ns = [int(ms * 1e6) for ms in self_ms]
    return pb.PhaseStats(
        phase=pid,
        module_id=ids,
        calls=[1] * len(ids),
        inclusive_ns=ns,
        self_ns=ns,
        first_start_ns=[1000] * len(ids),
        last_end_ns=[1000 + n for n in ns],
    )


def report(
    step: int,
    fwd_ms: list[float],
    bwd_ms: list[float] | None = None,
    wall_ms: float = 100.0,
    sync_ms: float = 1.0,
    start_ns: int | None = None,
    **fields,
) -> pb.StepReport:
    """One step of a rank: self times per module in ms (forward, and backward = forward unless given)."""
    bwd_ms = fwd_ms if bwd_ms is None else bwd_ms
    start = step * 1_000_000_000 if start_ns is None else start_ns
    r = pb.StepReport(
        step=step,
        start_ns=start,
        end_ns=start + int(wall_ms * 1e6),
        forward_ns=int(sum(fwd_ms) * 1e6),
        backward_ns=int(sum(bwd_ms) * 1e6),
        backward_tail_ns=int(sync_ms * 1e6),
        **fields,
    )
    r.phases.append(phase(pb.PHASE_FORWARD, fwd_ms))
    r.phases.append(phase(pb.PHASE_BACKWARD, bwd_ms))
    return r


def batch(reports: list[pb.StepReport]) -> pb.AgentMessage:
    """Several steps in one message, as the agent sends them."""
    return pb.AgentMessage(reports=pb.StepReportBatch(reports=reports))


class FakeRank:
    """One rank's stream: messages go in through a queue, answers are collected by a thread."""

    def __init__(
        self,
        target: str,
        job: str,
        rank: int,
        world_size: int,
        host: str | None = None,
        modules=MODULES,
        token: str | None = None,
        session: str = "s",
        hello=True,
    ):
        self.channel = grpc.insecure_channel(target)
        self.outgoing: queue.Queue = queue.Queue()
        self.acks: list[int] = []
        self.pongs: list = []
        self.controls: list = []
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        metadata = [("authorization", f"Bearer {token}")] if token else None
        self.responses = pb_grpc.CollectorStub(self.channel).Stream(iter(self.outgoing.get, None), metadata=metadata)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if hello:
            self.send(
                pb.AgentMessage(
                    hello=pb.Hello(
                        protocol_version=1,
                        job=job,
                        rank=rank,
                        world_size=world_size,
                        host=host or f"host{rank}",
                        pid=1000 + rank,
                        module_names=list(modules),
                        session=session,
                        clock_kind=pb.CLOCK_KIND_CPU,
                    )
                )
            )

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

    def reports(self, reps: list[pb.StepReport]) -> None:
        self.send(batch(reps))

    def wait_ack(self, step: int, timeout: float = 10.0) -> None:
        wait_for(
            lambda: self.acks and self.acks[-1] >= step,
            timeout,
            lambda: f"the ack of step {step}: acks {self.acks[-3:]} error {self.error}",
        )

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


def stream_steps(ranks: list[FakeRank], steps, fwd_ms_of=lambda rank, step: [1.0, 2.0, 3.0, 4.0, 5.0], **kw) -> None:
    """Every rank reports every step (fwd_ms_of(rank index, step) ms per module); wait for the last ack."""
    for step in steps:
        for i, r in enumerate(ranks):
            r.report(report(step, fwd_ms_of(i, step), **kw))
    for r in ranks:
        r.wait_ack(steps[-1])
