"""A StepReport checked and turned into a StepRow with job-wide module ids, in a few numpy passes.

Every problem raises edge_limits.Refused (INVALID_ARGUMENT) with the step, phase and field, so
the sender's stream ends with a reason a person can act on and nothing of the report is stored.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from modtrack.collector.ingest import edge_limits
from modtrack.collector.ingest.collectives_parse import parse_collectives
from modtrack.collector.ingest.edge_limits import invalid
from modtrack.collector.ingest.gpu_edge import parse_gpu
from modtrack.collector.records import (
    AGENT_COUNTERS,
    INT64_MAX,
    INT64_MIN,
    PHASE_NAMES,
    STEP_FIGURES,
    Phase,
    StepRow,
)

PHASE_COLUMNS = ("module_id", "calls", "inclusive_ns", "self_ns", "first_start_ns", "last_end_ns")
TRACE_FIELDS = ("module_id", "phase", "start_ns", "end_ns", "depth")


@dataclass(eq=False)
class RankStream:
    """One connected rank: its module-name table and the remap to job-wide ids."""

    job: str
    rank: int
    names: list
    remap: np.ndarray  # rank-local module id -> job-wide module id
    out: asyncio.Queue
    attempt: int = 0  # the job's attempt this stream belongs to (torchelastic restarts)
    duplicates_logged: bool = False  # a refused duplicate is logged once per stream


def _array(values, dtype) -> np.ndarray:
    return np.array(values, dtype=dtype) if len(values) else np.zeros(0, dtype)


# Rows of the one int64 block a report's phases are gathered into (see _phase_block).
_ID, _INCLUSIVE, _SELF, _FIRST_START, _LAST_END = range(5)


def parse_report(report, stream: RankStream, extend_table) -> StepRow:
    """Validate one StepReport and turn it into a StepRow with job-wide module ids.

    `extend_table(names)` returns job-wide ids for module names first seen in this report.
    All phases are copied into one block and checked in a handful of numpy passes; only a
    report that fails them is walked phase by phase, to say exactly what is wrong."""
    where = f"job {stream.job!r} rank {stream.rank} step {report.step}"
    gpu = parse_gpu(report, where)  # GPU health (issue 15)
    _add_new_names(report, stream, extend_table, where)
    figures = {name: getattr(report, name) for name in STEP_FIGURES}
    negative = [name for name in STEP_FIGURES[2:] if figures[name] < 0]
    if negative:
        raise invalid(f"{where}: negative duration {negative[0]}={figures[negative[0]]}")
    if figures["end_ns"] < figures["start_ns"]:
        raise invalid(f"{where}: end_ns {figures['end_ns']} is before start_ns {figures['start_ns']}")
    if figures["gc_ns"] > figures["end_ns"] - figures["start_ns"]:  # pauses on the training thread, in the step
        raise invalid(
            f"{where}: gc_ns {figures['gc_ns']} is longer than the step itself "
            f"({figures['end_ns'] - figures['start_ns']} ns from start_ns to end_ns)"
        )
    if figures["host_ns"] > figures["data_ns"]:  # the loop's own code is part of the time outside the phases
        raise invalid(f"{where}: host_ns {figures['host_ns']} is longer than data_ns {figures['data_ns']}")
    if figures["host_wait_ns"] > figures["host_ns"]:  # a wait inside the loop's own code is part of it
        raise invalid(f"{where}: host_wait_ns {figures['host_wait_ns']} is longer than host_ns {figures['host_ns']}")
    block, calls, phase, marks = _phase_block(report.phases, len(stream.remap))
    if block is None:
        _explain_phases(report, stream, where)  # raises Refused
    modules = {
        "phase": phase,
        "module": stream.remap[block[_ID]],
        "calls": calls,
        "inclusive": block[_INCLUSIVE],
        "self": block[_SELF],
        "first_start": block[_FIRST_START],
        "last_end": block[_LAST_END],
        **_call_windows(report.phases, calls, where),
    }
    counters = {name: getattr(report.counters, name) for name in AGENT_COUNTERS}
    collectives = parse_collectives(report, where) if report.collectives else []
    return StepRow(
        stream.job,
        stream.rank,
        report.step,
        figures,
        modules,
        _parse_trace(report, stream, where),
        counters,
        stream.attempt,
        collectives,
        gpu,
        detail=report.detail or len(report.phases) > 0,  # agents before sampled mode never set it
        pass_marks=marks,
    )


def _phase_block(phases, table_size: int):
    """(int64 block of 5 rows x all entries, calls, phase per entry, StepRow.pass_marks), or Nones when a phase
    is unknown, its columns differ in length, or an id, duration or stamp is out of bounds (then
    _explain_phases says which). A repeated field's slice is a list in one C copy (0.5 µs for 23 entries;
    iterating it 1.1-1.7 µs, numpy's copy 2.3-5 µs, numpy's min or max of a few values ~2.5 µs): so the
    columns are gathered into lists, checked with Python's min and max, and made one block in one conversion."""
    ids: list[int] = []
    inclusive: list[int] = []
    self_ns: list[int] = []
    first_start: list[int] = []
    last_end: list[int] = []
    calls: list[int] = []
    lengths = []
    forward_end, backward_start, backward_end = INT64_MIN, INT64_MAX, INT64_MIN  # StepRow.pass_marks
    for ph in phases:
        n = len(ph.module_id)
        if ph.phase not in PHASE_NAMES or not (
            len(ph.calls) == len(ph.inclusive_ns) == len(ph.self_ns) == len(ph.first_start_ns)
            == len(ph.last_end_ns) == n
        ):  # fmt: skip
            return None, None, None, None
        ids += ph.module_id[:]
        calls += ph.calls[:]
        inclusive += ph.inclusive_ns[:]
        self_ns += ph.self_ns[:]
        first_start += ph.first_start_ns[:]
        last_end += ph.last_end_ns[:]
        lengths.append(n)
        if n and ph.phase == Phase.PHASE_FORWARD:
            forward_end = max(forward_end, max(last_end[-n:]))
        elif n and ph.phase == Phase.PHASE_BACKWARD:
            backward_start = min(backward_start, min(first_start[-n:]))
            backward_end = max(backward_end, max(last_end[-n:]))
    if ids and not _columns_ok(ids, (inclusive, self_ns), (first_start, last_end), table_size):
        return None, None, None, None
    block = np.array((ids, inclusive, self_ns, first_start, last_end), np.int64)
    phase = np.repeat(np.array([ph.phase for ph in phases], np.uint8), lengths)
    return block, np.array(calls, np.uint32), phase, (forward_end, backward_start, backward_end)


def _columns_ok(ids: list[int], durations: tuple, stamps: tuple, table_size: int) -> bool:
    """Every id in the rank's table, durations in [0, a day], stamps in range (edge_limits.column_problem's
    bounds, on lists)."""
    if max(ids) >= table_size:
        return False
    if any(min(d) < 0 or max(d) > edge_limits.MAX_DURATION_NS for d in durations):
        return False
    limit = edge_limits.MAX_ABS_TIME_NS
    return all(min(t) >= -limit and max(t) <= limit for t in stamps)


def _call_windows(phases, calls: np.ndarray, where: str) -> dict:
    """Each call's window of the modules called several times (PhaseStats.call_start_ns/call_end_ns), where a
    phase sends them: {"call_owner": the entry of the modules arrays each belongs to, "call_start", "call_end"}
    (agent clock); {} when no phase does."""
    owners, starts, ends = [], [], []
    at = 0
    for ph in phases:
        n = len(ph.module_id)
        if len(ph.call_start_ns) or len(ph.call_end_ns):
            name = f"{where} phase {PHASE_NAMES[ph.phase]}"
            multi = np.flatnonzero(calls[at : at + n] > 1)
            repeats = calls[at : at + n][multi].astype(np.int64)
            if len(ph.call_start_ns) != len(ph.call_end_ns) or len(ph.call_start_ns) != repeats.sum():
                raise invalid(
                    f"{name}: call_start_ns and call_end_ns must have one entry per call of the modules called more "
                    f"than once ({int(repeats.sum())}), have {len(ph.call_start_ns)} and {len(ph.call_end_ns)}"
                )
            start, end = _array(ph.call_start_ns, np.int64), _array(ph.call_end_ns, np.int64)
            edge_limits.check_columns(f"{name} call windows", (), (start, end))
            edge_limits.check_columns(f"{name} call windows", (end - start,), ())
            owners.append(np.repeat(multi + at, repeats))
            starts.append(start)
            ends.append(end)
        at += n
    if not owners:
        return {}
    return {
        "call_owner": np.concatenate(owners),
        "call_start": np.concatenate(starts),
        "call_end": np.concatenate(ends),
    }


def _explain_phases(report, stream: RankStream, where: str) -> None:
    """The slow, phase-by-phase check of a report the block check refused: raises the first
    problem in phase order, with the phase and the field."""
    for ph in report.phases:
        if ph.phase not in PHASE_NAMES:
            raise invalid(f"{where}: unknown phase {ph.phase}")
        n = len(ph.module_id)
        for name in PHASE_COLUMNS[1:]:
            if len(getattr(ph, name)) != n:
                raise invalid(
                    f"{where} phase {PHASE_NAMES[ph.phase]}: {name} has "
                    f"{len(getattr(ph, name))} entries, module_id has {n}"
                )
        _module_ids(ph.module_id, stream, where)
        edge_limits.check_columns(
            f"{where} phase {PHASE_NAMES[ph.phase]}",
            (_array(ph.inclusive_ns, np.int64), _array(ph.self_ns, np.int64)),
            (_array(ph.first_start_ns, np.int64), _array(ph.last_end_ns, np.int64)),
        )
    raise AssertionError("the block check refused a report the phase check accepts")


def _add_new_names(report, stream: RankStream, extend_table, where: str) -> None:
    if not report.new_module_names:
        return
    first = report.first_new_module_id
    if first > len(stream.names):
        raise invalid(
            f"{where}: new module names start at id {first} but the rank's table has {len(stream.names)} names"
        )
    new = []
    for i, name in enumerate(report.new_module_names):
        if first + i < len(stream.names):  # a replayed report re-announcing a known name
            if stream.names[first + i] != name:
                raise invalid(f"{where}: module id {first + i} is {stream.names[first + i]!r}, not {name!r}")
        else:
            new.append(name)
    if new:
        stream.names.extend(new)
        stream.remap = np.concatenate([stream.remap, extend_table(new)])


def _module_ids(values, stream: RankStream, where: str) -> np.ndarray:
    local = _array(values, np.int64)
    if len(local) and local.max() >= len(stream.remap):
        raise invalid(f"{where}: module id {int(local.max())} is outside the rank's table of {len(stream.remap)} names")
    return local


def _parse_trace(report, stream: RankStream, where: str) -> dict | None:
    if not report.HasField("trace") or not len(report.trace.module_id):
        return None
    t = report.trace
    n = len(t.module_id)
    for name in TRACE_FIELDS[1:]:
        if len(getattr(t, name)) != n:
            raise invalid(f"{where} trace: {name} has {len(getattr(t, name))} entries, module_id has {n}")
    start, end = _array(t.start_ns, np.int64), _array(t.end_ns, np.int64)
    phase = _array(t.phase, np.int64)
    if (end < start).any():
        raise invalid(f"{where} trace: a call ends before it starts")
    edge_limits.check_columns(f"{where} trace", (end - start,), (start, end))
    if not np.isin(phase, list(PHASE_NAMES)).all():
        raise invalid(f"{where} trace: unknown phase")
    return {
        "module": stream.remap[_module_ids(t.module_id, stream, where)],
        "phase": phase,
        "start": start,
        "end": end,
        "depth": _array(t.depth, np.uint32),
        "capture_id": t.capture_id,
    }
