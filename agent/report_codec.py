"""StepRecord -> wire messages, on the sender thread, never on the training thread.

Runs once per step per rank, so numpy columns go into repeated fields with one
extend(array.tolist()) each: no per-module Python loop.
"""

from __future__ import annotations

import uuid

from modtrack.agent.identity import Identity
from modtrack.agent.step_record import PHASES, StepRecord
from modtrack.protos import modtrack_pb2 as pb

PROTOCOL_VERSION = 1
SESSION = uuid.uuid4().hex  # one per agent process: a restarted rank gets a new one

_PHASE_ENUM = {name: pb.Phase.Value(f"PHASE_{name.upper()}") for name in PHASES}  # forward=1, backward=2, ...
_CLOCK_ENUM = {"cpu": pb.CLOCK_KIND_CPU, "wall": pb.CLOCK_KIND_CPU, "cuda": pb.CLOCK_KIND_CUDA}
_COUNTERS = tuple(f.name for f in pb.AgentCounters.DESCRIPTOR.fields)  # the transport counters, by wire name


def _agent_version() -> str:
    try:
        from importlib.metadata import version

        return version("modtrack")
    except Exception:
        return "0"


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except Exception:
        return ""


AGENT_VERSION = _agent_version()


def encode_hello(identity: Identity, module_names: list[str], clock_kind: str) -> pb.AgentMessage:
    hello = pb.Hello(
        protocol_version=PROTOCOL_VERSION,
        job=identity.job,
        rank=identity.rank,
        local_rank=identity.local_rank,
        world_size=identity.world_size,
        group_rank=identity.group_rank,
        host=identity.host,
        pid=identity.pid,
        torch_version=_torch_version(),
        agent_version=AGENT_VERSION,
        clock_kind=_CLOCK_ENUM.get(clock_kind, pb.CLOCK_KIND_UNSPECIFIED),
        wall_durations=clock_kind == "wall",  # host clock, durations in wall time: they hold collective waits
        session=SESSION,
    )
    if identity.attempt is not None:
        hello.attempt = identity.attempt
    hello.module_names.extend(module_names)
    return pb.AgentMessage(hello=hello)


def encode_report(record: StepRecord, counters: dict[str, int]) -> pb.AgentMessage:
    """One step alone (`report`), as agents before StepReportBatch sent it."""
    message = pb.AgentMessage()
    fill_report(message.report, record, counters)
    return message


def fill_report(report: pb.StepReport, record: StepRecord, counters: dict[str, int]) -> None:
    """One step, columnar, into `report`. `counters` are the cumulative AgentCounters fields."""
    report.step = record.step
    report.start_ns = record.start_ns
    report.end_ns = record.end_ns
    report.forward_ns = record.forward_ns
    report.backward_ns = record.backward_ns
    report.optimizer_ns = record.optimizer_ns
    report.data_ns = record.data_ns
    report.backward_tail_ns = record.backward_tail_ns
    report.recompute_ns = record.recompute_ns
    report.gc_ns = record.gc_ns
    report.gc_collections = record.gc_collections
    report.host_ns = record.host_ns
    report.host_wait_ns = record.host_wait_ns
    report.first_new_module_id = record.first_new_module_id
    report.detail = record.detail
    for name in _COUNTERS:
        setattr(report.counters, name, counters.get(name, 0))
    report.new_module_names.extend(record.new_module_names)
    for name, cols in record.phases.items():
        stats = report.phases.add(phase=_PHASE_ENUM.get(name, pb.PHASE_UNSPECIFIED))
        stats.module_id.extend(cols.module_id.tolist())
        stats.calls.extend(cols.calls.tolist())
        stats.inclusive_ns.extend(cols.inclusive_ns.tolist())
        stats.self_ns.extend(cols.self_ns.tolist())
        stats.first_start_ns.extend(cols.first_start_ns.tolist())
        stats.last_end_ns.extend(cols.last_end_ns.tolist())
        if len(cols.call_start_ns):
            stats.call_start_ns.extend(cols.call_start_ns.tolist())
            stats.call_end_ns.extend(cols.call_end_ns.tolist())
    for stats in record.collectives:  # agent/collectives.py, maybe of earlier steps
        out = report.collectives.add(
            step=stats.step,
            group=stats.group,
            backend=stats.backend,
            group_size=stats.group_size,
            ranks_hash=stats.ranks_hash,
            count=stats.count,
            total_ns=stats.total_ns,
            wait_ns=stats.wait_ns,
            bytes=stats.bytes,
            active_measured=stats.active_measured,
            unlisted=stats.unlisted,
        )
        out.seq.extend(stats.seq)
        out.issue_ns.extend(stats.issue_ns)
        out.active_ns.extend(stats.active_ns)
    trace = record.trace
    if trace is not None:
        report.trace.capture_id = trace.capture_id
        report.trace.module_id.extend(trace.module_id.tolist())
        report.trace.phase.extend((trace.phase.astype("int64") + 1).tolist())  # index in PHASES -> enum number
        report.trace.start_ns.extend(trace.start_ns.tolist())
        report.trace.end_ns.extend(trace.end_ns.tolist())
        report.trace.depth.extend(trace.depth.tolist())


def wire_bytes_bound(record: StepRecord) -> int:
    """An upper bound of a record's encoded size, without encoding it: at most 10 bytes per varint,
    6 per phase entry, 2 per call window, 5 per trace entry and 3 per collective entry, plus the names and a
    GPU sample."""
    entries = sum(len(cols.module_id) for cols in record.phases.values())
    windows = sum(len(cols.call_start_ns) for cols in record.phases.values())
    traced = 0 if record.trace is None else len(record.trace.module_id)
    names = sum(len(n) + 3 for n in record.new_module_names)
    collectives = sum(
        200 + len(c.group) + len(c.backend) + 11 * (len(c.seq) + len(c.issue_ns) + len(c.active_ns))
        for c in record.collectives
    )
    return 1200 + 62 * entries + 22 * windows + 52 * traced + names + collectives
