"""A small in-test collector for the agent's tests: a real gRPC server on loopback that records what
arrives, acks, answers clock pings, sends controls and drops streams on request."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures

import grpc

from harness.ports import free_port
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc


class FakeCollector(pb_grpc.CollectorServicer):
    """Records what arrives; acks, pongs, sends controls, and drops streams on request."""

    def __init__(self, ack=True, drop_at_once=False, batches=True):
        self.ack = ack
        self.drop_at_once = drop_at_once
        self.batches = batches  # False: refuses a StepReportBatch as a collector that predates it does
        self.hellos: list[tuple[float, pb.Hello]] = []
        self.received: list[int] = []  # report steps, in arrival order, duplicates kept
        self.messages: list[list[int]] = []  # the steps of each message that carried reports
        self.reports: dict[int, pb.StepReport] = {}
        self.acked: set[int] = set()
        self.offsets: list[pb.ClockOffset] = []
        self.pings = 0
        self.metadata: list[dict] = []
        self._outs: list[queue.Queue] = []
        self._lock = threading.Lock()

    def Stream(self, request_iterator, context):
        self.metadata.append(dict(context.invocation_metadata()))
        out: queue.Queue = queue.Queue()
        with self._lock:
            self._outs.append(out)

        def read():
            try:
                for msg in request_iterator:
                    kind = msg.WhichOneof("body")
                    if kind == "hello":
                        self.hellos.append((time.monotonic(), msg.hello))
                        if self.drop_at_once:
                            break
                    elif kind == "reports" and not self.batches:
                        out.put("an empty AgentMessage")
                        return
                    elif kind in ("report", "reports"):
                        reports = [msg.report] if kind == "report" else list(msg.reports.reports)
                        self.messages.append([r.step for r in reports])
                        for r in reports:
                            self.received.append(r.step)
                            self.reports[r.step] = r
                        if self.ack:
                            self.acked.update(r.step for r in reports)
                            out.put(pb.CollectorMessage(ack=pb.Ack(step=max(r.step for r in reports))))
                    elif kind == "ping":
                        self.pings += 1
                        t2 = time.time_ns()
                        pong = pb.ClockPong(t1_ns=msg.ping.t1_ns, t2_ns=t2, t3_ns=time.time_ns())
                        out.put(pb.CollectorMessage(pong=pong))
                    elif kind == "clock":
                        self.offsets.append(msg.clock)
            except Exception:
                pass
            out.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            while context.is_active():
                try:
                    item = out.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is None:
                    return
                if isinstance(item, str):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, item)
                yield item
        finally:
            with self._lock:
                self._outs.remove(out)

    def send(self, message: pb.CollectorMessage | None) -> None:
        with self._lock:
            for out in self._outs:
                out.put(message)

    def drop_streams(self) -> None:
        """End every open stream from the server side: the agent has to reconnect."""
        self.send(None)


class FakeCollectorServers:
    """Starts FakeCollectors on loopback ports; stop() ends them all (the `serve` fixture)."""

    def __init__(self):
        self.servers: list[grpc.Server] = []

    def __call__(self, fake: FakeCollector, port: int | None = None) -> tuple[grpc.Server, int]:
        port = port or free_port()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_CollectorServicer_to_server(fake, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        self.servers.append(server)
        return server, port

    def stop(self) -> None:
        for server in self.servers:
            server.stop(0)
