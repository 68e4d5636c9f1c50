"""One step's raw module calls, and how they become a columnar StepRecord.

The hooks only append small int lists (one "row" per module call) and stamp times into them; all
arithmetic (durations, self time, per-module sums) happens once per step here, with numpy.

Each call carries two kinds of stamps: timestamps (F_START..B_END: the clock's `stamp`, wall time on
CPU, event tokens on CUDA) say *when*; work stamps (F_WORK_START..B_WORK_END: the clock's
`work_stamp`, thread CPU time on CPU by default) say *how much*. On CPU, inclusive and self time are
work-stamp differences; on CUDA (a token table is given) they are event differences.
"""
from __future__ import annotations

import numpy as np

from modtrack.agent.step_record import PHASES, PhaseColumns, StepRecord, TraceColumns

# A row is a list of ints, one per module call:
(MID, PHASE, F_START, F_END, PARENT, DEPTH, RECURSIVE, B_START, B_END, PENDING,
 F_WORK_START, F_WORK_END, B_WORK_START, B_WORK_END) = range(14)
ROW_WIDTH = 14
FORWARD, BACKWARD, RECOMPUTE = (PHASES.index(p) for p in ("forward", "backward", "recompute"))
_TIME_COLUMNS = [F_START, F_END, B_START, B_END]


def new_row(mid: int, phase: int, parent: int, depth: int, recursive: int) -> list:
    """F_START..B_END are stamps (0: never stamped); PARENT is the caller's row index (-1: none);
    RECURSIVE is 1 when the module was already running (its time is already in the outer call)."""
    return [mid, phase, 0, 0, parent, depth, recursive, 0, 0, 0, 0, 0, 0, 0]


class StepLog:
    """Everything stamped during one step. Stamps are clock tokens, turned into ns at build time."""

    def __init__(self, start_host_ns: int) -> None:
        self.start_host_ns = start_host_ns
        self.end_host_ns = 0
        self.rows: list[list] = []
        self.passes: list[list] = []  # backward passes: [start, end, last module backward end]
        self.optimizer: list[tuple[int, int]] = []  # optimizer.step() calls: (start, end)
        self.rows_at_pass_end = 0

    def is_empty(self) -> bool:
        return not (self.rows or self.passes or self.optimizer)


def _phase_columns(mid, incl, self_ns, start, end, counted) -> PhaseColumns:
    """Sum per module. `counted` excludes recursive inner calls from the inclusive sum."""
    ids, inv = np.unique(mid, return_inverse=True)
    n = len(ids)
    calls = np.bincount(inv, minlength=n)
    inclusive = np.bincount(inv, weights=incl * counted, minlength=n)
    self_sum = np.bincount(inv, weights=self_ns, minlength=n)
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, inv, start)
    last = np.zeros(n, dtype=np.int64)
    np.maximum.at(last, inv, end)
    return PhaseColumns(
        module_id=ids.astype(np.uint32),
        calls=calls.astype(np.uint32),
        inclusive_ns=np.round(inclusive).astype(np.int64),
        self_ns=np.round(self_sum).astype(np.int64),
        first_start_ns=first,
        last_end_ns=last,
    )


def _self_times(incl, parent, valid):
    """Inclusive minus the inclusive time of direct children (rows whose PARENT is this row), and how
    many calls had children longer than themselves (windows that overlap: counted, then clipped to 0)."""
    n = len(incl)
    has_parent = valid & (parent >= 0)
    children = np.bincount(parent[has_parent], weights=incl[has_parent], minlength=n)[:n]
    self_ns = incl - children
    return np.maximum(self_ns, 0), int(np.count_nonzero(self_ns < 0))


def _durations(pairs: list, table) -> np.ndarray:
    """(start, end) stamp pairs -> ns, pairs never closed count 0."""
    if not pairs:
        return np.zeros(0, dtype=np.int64)
    a = np.asarray(pairs, dtype=np.int64).reshape(len(pairs), -1)
    valid = (a[:, 0] > 0) & (a[:, 1] > 0)
    if table is not None:
        a = table[a]
    return np.where(valid, a[:, 1] - a[:, 0], 0)


def build_step_record(log: StepLog, step: int, table: np.ndarray | None = None,
                      trace_id: str | None = None) -> StepRecord:
    """Aggregate one step. `table` maps clock tokens to ns (CUDA); None when stamps are ns (CPU)."""
    record = StepRecord(step=step, start_ns=log.start_host_ns, end_ns=log.end_host_ns)
    if log.rows:
        rows = np.asarray(log.rows, dtype=np.int64)
        if table is not None:
            rows[:, _TIME_COLUMNS] = table[rows[:, _TIME_COLUMNS]]
    else:
        rows = np.zeros((0, ROW_WIDTH), dtype=np.int64)
    mid, phase, parent, depth = rows[:, MID], rows[:, PHASE], rows[:, PARENT], rows[:, DEPTH]
    counted = 1 - rows[:, RECURSIVE]

    f_valid = (rows[:, F_START] > 0) & (rows[:, F_END] > 0)
    f_wall = np.where(f_valid, rows[:, F_END] - rows[:, F_START], 0)
    b_valid = (rows[:, B_START] > 0) & (rows[:, B_END] >= rows[:, B_START])
    if table is None:  # CPU: durations from the work stamps (never negative: a thread's CPU time only grows)
        f_incl = np.where(f_valid, np.maximum(rows[:, F_WORK_END] - rows[:, F_WORK_START], 0), 0)
        b_incl = np.where(b_valid, np.maximum(rows[:, B_WORK_END] - rows[:, B_WORK_START], 0), 0)
    else:
        f_incl = f_wall
        b_incl = np.where(b_valid, rows[:, B_END] - rows[:, B_START], 0)
    f_self, f_overlaps = _self_times(f_incl, parent, f_valid)
    b_self, b_overlaps = _self_times(b_incl, parent, b_valid)
    record.overlapping_calls = f_overlaps + b_overlaps

    for name, mask, incl, self_ns, start, end in (
        ("forward", f_valid & (phase == FORWARD), f_incl, f_self, F_START, F_END),
        ("recompute", f_valid & (phase == RECOMPUTE), f_incl, f_self, F_START, F_END),
        ("backward", b_valid, b_incl, b_self, B_START, B_END),
    ):
        if mask.any():
            record.phases[name] = _phase_columns(
                mid[mask], incl[mask], self_ns[mask], rows[mask, start], rows[mask, end], counted[mask])

    top = depth == 0
    # step phases are wall time, like the step itself: data_ns is what is left of the wall
    record.forward_ns = int(f_wall[top & (phase == FORWARD)].sum())
    record.recompute_ns = int(f_wall[top & (phase == RECOMPUTE)].sum())
    passes = [p for p in log.passes if p[0] > 0]
    record.backward_ns = int(_durations([p[:2] for p in passes], table).sum())
    record.backward_tail_ns = int(np.maximum(_durations([p[2:0:-1] for p in passes], table), 0).sum())
    record.optimizer_ns = int(_durations(log.optimizer, table).sum())
    busy = record.forward_ns + record.backward_ns + record.optimizer_ns
    record.data_ns = max(0, record.wall_ns - busy)
    if trace_id is not None:
        record.trace = _trace(rows, f_valid, b_valid, trace_id)
    return record


def _trace(rows, f_valid, b_valid, capture_id: str) -> TraceColumns:
    fw, bw = rows[f_valid], rows[b_valid]
    start = np.concatenate([fw[:, F_START], bw[:, B_START]])
    order = np.argsort(start, kind="stable")
    phase = np.concatenate([fw[:, PHASE], np.full(len(bw), BACKWARD)])
    return TraceColumns(
        module_id=np.concatenate([fw[:, MID], bw[:, MID]])[order].astype(np.uint32),
        phase=phase[order].astype(np.uint8),
        start_ns=start[order],
        end_ns=np.concatenate([fw[:, F_END], bw[:, B_END]])[order],
        depth=np.concatenate([fw[:, DEPTH], bw[:, DEPTH]])[order].astype(np.uint32),
        capture_id=capture_id,
    )


def step_summary(record: StepRecord, names: list[str]) -> dict:
    """last_step()'s shape: {(module_name, phase): {"calls", "inclusive_ms", "self_ms"}}."""
    out = {}
    for phase, cols in record.phases.items():
        for mid, calls, incl, self_ns in zip(cols.module_id.tolist(), cols.calls.tolist(),
                                             cols.inclusive_ns.tolist(), cols.self_ns.tolist()):
            out[(names[mid], phase)] = {"calls": calls, "inclusive_ms": incl / 1e6, "self_ms": self_ns / 1e6}
    return out
