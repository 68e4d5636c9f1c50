"""One step's raw module calls, and how they become a columnar StepRecord.

The hooks only append small int lists (one "row" per module call) and stamp times into them; all
arithmetic (durations, self time, per-module sums) happens here, with numpy, and not on the training
thread: at a step's end the tracker hands over its StepLog as a DeferredStepRecord, and the sender thread
aggregates every step waiting for it in one pass (build_step_records), a few times a second.

Each call carries two kinds of stamps: timestamps (F_START..B_END: the clock's `stamp`, wall time on
CPU, event tokens on CUDA) say *when*; work stamps (F_WORK_START..B_WORK_END: the clock's
`work_stamp`, thread CPU time on CPU by default) say *how much*. On CPU, inclusive and self time are
work-stamp differences; on CUDA (a token table is given) they are event differences. A CUDA step's
record carries its EventBatch (agent/clocks.py): the sender aggregates it once the GPU has passed its
last event (`ready`), and resolves the events there, never on the training thread.
"""

from __future__ import annotations

import bisect

import numpy as np

from modtrack.agent.outside_spans import host_wait_ns
from modtrack.agent.step_record import PHASES, PhaseColumns, StepRecord, TraceColumns

# A row is a list of ints, one per module call:
(
    MID,
    PHASE,
    F_START,
    F_END,
    PARENT,
    DEPTH,
    RECURSIVE,
    B_START,
    B_END,
    PENDING,
    F_WORK_START,
    F_WORK_END,
    B_WORK_START,
    B_WORK_END,
) = range(14)
ROW_WIDTH = 14
FORWARD, BACKWARD, RECOMPUTE = (PHASES.index(p) for p in ("forward", "backward", "recompute"))
_TIME_COLUMNS = [F_START, F_END, B_START, B_END]
_WORK_COLUMNS = [F_WORK_START, F_WORK_END, B_WORK_START, B_WORK_END]
MAX_CALL_WINDOWS = 4096  # call windows of one phase of a step (PhaseColumns.call_start_ns): beyond, none are sent


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
        self.wrapped: list[list[int]] = []  # outermost wrapper forwards (DDP, FSDP1): [start, end]
        self.rows_at_pass_end = 0
        self.detail = True  # sampled mode: False on steps timed at the top level only (no module detail)
        self.call_windows = False  # send each call's window of modules called several times (PhaseColumns)
        # full garbage collections on the training thread (agent/gc_pauses.py): [work start, work end, wall start,
        # wall end, outside every phase]; module windows leave them out, data_ns too
        self.gc: list[list[int]] = []
        self.fetches: list[tuple] = []  # DataLoader next() calls on the training thread: agent/data_loading.py
        self.outside: list[tuple] = []  # stretches outside every phase: agent/outside_spans.py

    def is_empty(self) -> bool:
        return not (self.rows or self.passes or self.optimizer or self.wrapped)


class _Built:
    """A StepRecord field of a DeferredStepRecord: reading it builds the record first."""

    def __set_name__(self, owner, name):
        self.key = "_built_" + name

    def __get__(self, record, owner=None):
        if record is None:
            return self
        if record._source is not None:
            build_step_records([record])
        return getattr(record, self.key)

    def __set__(self, record, value):
        setattr(record, self.key, value)


class DeferredStepRecord(StepRecord):
    """A finished step whose aggregation has not run yet: the training thread only hands over its StepLog.

    The figures (phases, forward_ns, ...) are computed the first time anything reads them, or, for many
    steps at once in one numpy pass, by `build_step_records` on the sender thread. Building is idempotent
    (every field is assigned its final value once), so a reader on another thread at worst builds twice.
    """

    overlapping_calls = _Built()
    forward_ns = _Built()
    backward_ns = _Built()
    optimizer_ns = _Built()
    data_ns = _Built()
    backward_tail_ns = _Built()
    recompute_ns = _Built()
    gc_ns = _Built()
    gc_collections = _Built()
    host_ns = _Built()
    host_wait_ns = _Built()
    phases = _Built()
    trace = _Built()

    def __init__(
        self,
        log: StepLog,
        step: int,
        table=None,
        trace_id: str | None = None,
        counters: dict | None = None,
    ):
        """`table`: None (stamps are ns), a token -> ns array, or the step's EventBatch (CUDA: resolved when
        built). `counters` (the tracker's) gets the calls that overlapped their children once this is built."""
        self.step = step
        self.start_ns = log.start_host_ns
        self.end_ns = log.end_host_ns
        self.first_new_module_id = 0
        self.new_module_names = []
        self.detail = log.detail
        self.collectives = []
        self._source = (log, table, trace_id, counters)

    @property
    def built(self) -> bool:
        return self._source is None

    @property
    def ready(self) -> bool:
        """Can be built without waiting: no events, or the GPU has passed the step's last one."""
        source = self._source
        if source is None:
            return True
        table = source[1]
        return table is None or isinstance(table, np.ndarray) or table.ready()

    @property
    def raw_calls(self) -> int:
        """Module calls still held raw (0 once built): what this record costs in memory."""
        return 0 if self._source is None else len(self._source[0].rows)

    def build(self) -> DeferredStepRecord:
        if self._source is not None:
            build_step_records([self])
        return self


def build_step_record(
    log: StepLog, step: int, table: np.ndarray | None = None, trace_id: str | None = None
) -> StepRecord:
    """Aggregate one step now. `table` maps clock tokens to ns (CUDA); None when stamps are ns (CPU)."""
    return DeferredStepRecord(log, step, table, trace_id).build()


def _resolve(batch, log: StepLog, counters: dict | None) -> np.ndarray:
    """A CUDA step's token table (waits for the GPU only if the step was not ready: a reader asking now).
    Events that cannot be read time nothing (all tokens read 0), counted."""
    try:
        if not batch.ready():
            batch.wait()
        table = batch.resolve()
        if table is not None:
            return table
    except Exception:
        batch.release()
    if counters is not None:
        counters["unresolved_steps"] = counters.get("unresolved_steps", 0) + 1
    tokens = max((max(row[F_START], row[F_END], row[B_START], row[B_END]) for row in log.rows), default=0)
    return np.zeros(max(tokens, *(max(p) for p in log.passes), *(max(o) for o in log.optimizer), 0) + 1, np.int64)


def _span_ns(pairs, table) -> int:
    """Sum of (start, end) stamp pairs in ns; pairs never closed count 0 (a few per step: plain Python)."""
    total = 0
    for start, end in pairs:
        if start > 0 and end > 0:
            total += int(table[end] - table[start]) if table is not None else end - start
    return total


def build_step_records(records: list[StepRecord]) -> None:
    """Aggregate every unbuilt record of `records` in one numpy pass over all their rows.

    The cost of a pass is mostly numpy's per-call overhead, not the rows: done for N steps at once it is
    paid once, not N times. All arithmetic is vectorized over steps x module calls.
    """
    todo: list = []
    for record in records:
        source = getattr(record, "_source", None)  # a plain StepRecord is built already
        if source is not None:
            log, table, trace_id, counters = source
            if table is not None and not isinstance(table, np.ndarray):
                table = _resolve(table, log, counters)
            todo.append((record, log, table, trace_id, counters))
    if not todo:
        return
    counts = [len(log.rows) for _, log, _, _, _ in todo]
    total = sum(counts)
    if total:
        rows = np.asarray([row for _, log, _, _, _ in todo for row in log.rows], dtype=np.int64)
    else:
        rows = np.zeros((0, ROW_WIDTH), dtype=np.int64)
    bounds = np.zeros(len(todo) + 1, dtype=np.int64)
    np.cumsum(counts, out=bounds[1:])
    timed_by_events = np.zeros(total, dtype=bool)  # CUDA: durations from event times, not work stamps
    for i, (_, _, table, _, _) in enumerate(todo):
        if table is not None and counts[i]:
            lo, hi = bounds[i], bounds[i + 1]
            rows[lo:hi, _TIME_COLUMNS] = table[rows[lo:hi, _TIME_COLUMNS]]
            timed_by_events[lo:hi] = True
    for i, (_, log, _, _, _) in enumerate(todo):
        if log.gc and counts[i] and not timed_by_events[bounds[i]]:  # CUDA events time the GPU, not the pause
            _leave_out_pauses(rows[bounds[i] : bounds[i + 1]], log.gc)
    step_of_row = np.repeat(np.arange(len(todo)), counts)
    mid, phase, depth = rows[:, MID], rows[:, PHASE], rows[:, DEPTH]
    parent = np.where(rows[:, PARENT] >= 0, rows[:, PARENT] + bounds[step_of_row], -1)
    counted = 1 - rows[:, RECURSIVE]

    f_valid = (rows[:, F_START] > 0) & (rows[:, F_END] > 0)
    f_wall = np.where(f_valid, rows[:, F_END] - rows[:, F_START], 0)
    b_valid = (rows[:, B_START] > 0) & (rows[:, B_END] >= rows[:, B_START])
    # CPU: durations from the work stamps (never negative: a thread's CPU time only grows); CUDA: events
    f_work = np.maximum(rows[:, F_WORK_END] - rows[:, F_WORK_START], 0)
    b_work = np.maximum(rows[:, B_WORK_END] - rows[:, B_WORK_START], 0)
    f_incl = np.where(f_valid, np.where(timed_by_events, f_wall, f_work), 0)
    b_incl = np.where(b_valid, np.where(timed_by_events, rows[:, B_END] - rows[:, B_START], b_work), 0)
    b_parent = parent
    recomputes = np.flatnonzero(f_valid & (phase == RECOMPUTE) & (parent < 0))
    if len(recomputes) and b_valid.any():
        taken, b_parent = _recompute_inside(rows, step_of_row, recomputes, f_incl, b_valid, parent)
        b_incl = b_incl - taken
    f_self, f_overlaps = _self_times(f_incl, parent, f_valid)
    b_self, b_overlaps = _self_times(b_incl, b_parent, b_valid)
    overlaps = np.bincount(step_of_row, weights=f_overlaps.astype(np.int64) + b_overlaps, minlength=len(todo))

    n_steps = len(todo)
    phases: list[dict] = [{} for _ in range(n_steps)]
    windows = np.array([log.call_windows for _, log, _, _, _ in todo], bool)
    for name, mask, incl, self_ns, start, end in (
        ("forward", f_valid & (phase == FORWARD), f_incl, f_self, F_START, F_END),
        ("recompute", f_valid & (phase == RECOMPUTE), f_incl, f_self, F_START, F_END),
        ("backward", b_valid, b_incl, b_self, B_START, B_END),
    ):
        if mask.any():
            _phase_columns(
                phases,
                name,
                step_of_row[mask],
                mid[mask],
                incl[mask],
                self_ns[mask],
                rows[mask, start],
                rows[mask, end],
                counted[mask],
                windows,
            )

    top = depth == 0
    forward = np.bincount(step_of_row, weights=f_wall * (top & (phase == FORWARD)), minlength=n_steps)
    recompute = np.bincount(step_of_row, weights=f_wall * (top & (phase == RECOMPUTE)), minlength=n_steps)
    for i, (record, log, table, trace_id, counters) in enumerate(todo):
        record._source = None  # the raw rows are let go; from here on its fields are read as they are set
        record.overlapping_calls = int(overlaps[i])
        if counters is not None and record.overlapping_calls:
            counters["overlapping_calls"] = counters.get("overlapping_calls", 0) + record.overlapping_calls
        # step phases are wall time, like the step itself: data_ns is what is left of the wall
        passes = [p for p in log.passes if p[0] > 0]
        # a wrapper's forward (FSDP1's root all-gather, DDP's buffer sync) is forward time too
        record.forward_ns = max(int(forward[i]), _span_ns(log.wrapped, table))
        record.recompute_ns = int(recompute[i])
        record.backward_ns = _span_ns([(p[0], p[1]) for p in passes], table)
        record.backward_tail_ns = sum(max(0, _span_ns([(p[2], p[1])], table)) for p in passes)
        record.optimizer_ns = _span_ns(log.optimizer, table)
        busy = record.forward_ns + record.backward_ns + record.optimizer_ns
        # each pause clipped to the step: one can begin at the step boundary, after its end was stamped
        start, end = log.start_host_ns, log.end_host_ns or log.start_host_ns
        spans = [(max(0, min(p[3], end) - max(p[2], start)), p[4]) for p in log.gc]
        record.gc_ns = sum(span for span, _ in spans)
        record.gc_collections = len(spans)
        outside = sum(span for span, in_data in spans if in_data)  # a pause while loading data is no data loading
        record.data_ns = max(0, record.wall_ns - busy - outside)
        lo, hi = bounds[i], bounds[i + 1]
        if log.fetches:  # the loop fetched from a DataLoader: the rest outside the phases is its own code, wherever
            fetched = sum(max(0, min(f[1], end) - max(f[0], start)) for f in log.fetches)  # (a fetch between forward
            record.host_ns = max(0, record.data_ns - fetched)  # and backward too: that is data loading)
        else:
            top_forward = top[lo:hi] & (phase[lo:hi] == FORWARD) & f_valid[lo:hi]
            forward_ends = rows[lo:hi, F_END][top_forward].tolist()
            forward_ends += [_ns(w[1], table) for w in log.wrapped if w[1] > 0]
            record.host_ns = min(record.data_ns, _loop_code_ns(forward_ends, passes, log.optimizer, table))
        record.host_wait_ns = host_wait_ns(log.outside, log.fetches, record.host_ns)
        record.phases = phases[i] if log.detail else {}  # sampled mode: top-level calls only give step figures
        record.trace = None if trace_id is None else _trace(rows[lo:hi], f_valid[lo:hi], b_valid[lo:hi], trace_id)


def _ns(stamp: int, table) -> int:
    return int(table[stamp]) if table is not None else stamp


def _loop_code_ns(forward_ends: list[int], passes: list, optimizer: list, table) -> int:
    """The training loop's own code between the phases (StepReport.host_ns): from the end of the forward right
    before each backward pass to the pass's start (the loss, a user's metrics), and from the last pass's end to the
    optimizer step's start (gradient clipping, logging). None where another pass or forward came between: the time
    after a micro-batch's backward is the next one's data loading; a closure's forward runs inside the optimizer.
    agent/outside_spans.py's LOOP_CODE names the same stretches for their waits (CPU clock): change both as one."""
    ends = sorted(forward_ends)
    total = 0
    last_end = 0
    for start, end, *_ in sorted(passes):
        start = _ns(start, table)
        i = bisect.bisect_right(ends, start) - 1
        if i >= 0 and ends[i] > last_end:
            total += start - ends[i]
        last_end = max(last_end, _ns(end, table) if end > 0 else start)
    starts = [_ns(o[0], table) for o in optimizer if o[0] > 0] if last_end else []
    first = min((s for s in starts if s >= last_end), default=0)
    if first and not any(last_end < e <= first for e in ends):
        total += first - last_end
    return total


def _leave_out_pauses(rows: np.ndarray, pauses: list) -> None:
    """Work stamps as if the step's GC pauses took no time: each stamp less every pause that ended before it (in
    place). A window that holds a pause is shorter by it, its callers' too; stamps never made (0) stay 0."""
    p = np.asarray(pauses, dtype=np.int64)
    ends = p[:, 1]
    taken = np.zeros(len(p) + 1, dtype=np.int64)
    np.cumsum(np.maximum(p[:, 1] - p[:, 0], 0), out=taken[1:])
    stamps = rows[:, _WORK_COLUMNS]
    rows[:, _WORK_COLUMNS] = np.where(stamps > 0, stamps - taken[np.searchsorted(ends, stamps, side="right")], 0)


def _phase_columns(out: list[dict], name: str, step, mid, incl, self_ns, start, end, counted, windows) -> None:
    """Sum per (step, module) and hand each step its slice. `counted` keeps recursive inner calls out of
    the inclusive sum. Steps whose `windows` entry is set also get each call's window of the modules called
    more than once (at most MAX_CALL_WINDOWS per phase, else none)."""
    width = int(mid.max()) + 1
    ids, inv = _groups(step * width + mid, len(out) * width)
    n = len(ids)
    calls = np.bincount(inv, minlength=n).astype(np.uint32)
    inclusive = np.round(np.bincount(inv, weights=incl * counted, minlength=n)).astype(np.int64)
    self_sum = np.round(np.bincount(inv, weights=self_ns, minlength=n)).astype(np.int64)
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, inv, start)
    last = np.zeros(n, dtype=np.int64)
    np.maximum.at(last, inv, end)
    module_id = (ids % width).astype(np.uint32)
    group_step = ids // width
    edges = np.searchsorted(group_step, np.arange(len(out) + 1)).tolist()
    multi = windows[step] & (calls[inv] > 1) if windows.any() else np.zeros(0, bool)
    some = bool(multi.any())
    if some:  # each call of a module called several times: by entry (so by step), then by start
        order = np.flatnonzero(multi)[np.lexsort((start[multi], inv[multi]))]
        call_step, call_start, call_end = step[order], start[order], end[order]
        call_edges = np.searchsorted(call_step, np.arange(len(out) + 1)).tolist()
    for i in np.unique(group_step).tolist():
        lo, hi = edges[i], edges[i + 1]
        cols = out[i][name] = PhaseColumns(
            module_id=module_id[lo:hi],
            calls=calls[lo:hi],
            inclusive_ns=inclusive[lo:hi],
            self_ns=self_sum[lo:hi],
            first_start_ns=first[lo:hi],
            last_end_ns=last[lo:hi],
        )
        if some and 0 < call_edges[i + 1] - call_edges[i] <= MAX_CALL_WINDOWS:
            cols.call_start_ns = call_start[call_edges[i] : call_edges[i + 1]]
            cols.call_end_ns = call_end[call_edges[i] : call_edges[i + 1]]


def _groups(keys: np.ndarray, key_space: int) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(keys, return_inverse=True) for keys in [0, key_space); by a dense table when the space is
    not much larger than the keys (a few steps x modules: several times cheaper than unique's sort)."""
    if key_space > 8 * len(keys) + 4096:
        return np.unique(keys, return_inverse=True)
    present = np.zeros(key_space, dtype=bool)
    present[keys] = True
    slot = np.cumsum(present) - 1
    return np.flatnonzero(present), slot[keys]


def _recompute_inside(rows, step_of_row, recomputes, f_incl, b_valid, parent):
    """Activation checkpointing: the recompute inside backward windows, and where a recompute's backward nests.

    A checkpointed block's forward runs again in backward, inside the backward window of whatever module's
    gradient first needs its activations (non-reentrant checkpointing: the last module of the block that saved a
    tensor, and its callers), or inside the checkpoint's own node (reentrant). That time is the block's recompute
    phase: left in the windows it would be counted twice, and the module it landed in would read as slow as the
    whole block. Reentrant checkpointing also runs the recomputed graph's backward inside that node: the block's
    modules' backward, which nests in the innermost window around it (as a call's children do).
    `recomputes`: the rows of the top-level recompute calls, few per step (one per checkpointed block).
    Returns (per row, the recompute time inside its backward window; the backward PARENT column to use)."""
    taken = np.zeros(len(rows), np.int64)
    b_parent = parent.copy()
    for step in np.unique(step_of_row[recomputes]):
        windows = np.flatnonzero(b_valid & (step_of_row == step))
        if not len(windows):
            continue
        calls = recomputes[step_of_row[recomputes] == step]
        start, end = rows[windows, B_START][:, None], rows[windows, B_END][:, None]
        inside = (start <= rows[calls, F_START]) & (rows[calls, F_END] <= end)
        taken[windows] = inside @ f_incl[calls]
        ran_backward = calls[b_valid[calls]]  # reentrant
        if len(ran_backward):
            outer = rows[windows, PHASE] != RECOMPUTE  # not the recomputed calls themselves
            around = (start <= rows[ran_backward, B_START]) & (rows[ran_backward, B_END] <= end) & outer[:, None]
            length = np.where(around, end - start, np.iinfo(np.int64).max)
            innermost = np.argmin(length, axis=0)
            found = around[innermost, np.arange(len(ran_backward))]
            b_parent[ran_backward[found]] = windows[innermost[found]]
    return taken, b_parent


def _self_times(incl, parent, valid):
    """Inclusive minus the inclusive time of direct children (rows whose PARENT is this row), and which calls
    had children longer than themselves (windows that overlap: counted, then clipped to 0)."""
    n = len(incl)
    has_parent = valid & (parent >= 0)
    children = np.bincount(parent[has_parent], weights=incl[has_parent], minlength=n)[:n]
    self_ns = incl - children
    return np.maximum(self_ns, 0), self_ns < 0


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
        for mid, calls, incl, self_ns in zip(
            cols.module_id.tolist(), cols.calls.tolist(), cols.inclusive_ns.tolist(), cols.self_ns.tolist()
        ):
            out[(names[mid], phase)] = {"calls": calls, "inclusive_ms": incl / 1e6, "self_ms": self_ns / 1e6}
    return out
