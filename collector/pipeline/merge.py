"""Step assembly: line the ranks' reports up by step and hand out StepMatrix objects.

A step is evaluated once every live rank has reported it, or `watermark_s` after its first
report, whichever comes first, and steps of one job are evaluated in ascending order. A rank
with no report for `missing_after_s` is marked missing: it is not waited for, and it is not a
straggler (it simply is not in the matrix). Reports for steps already evaluated are stored but
not merged again. A torchelastic restart is a new attempt of the job: its steps start again at 0,
are stored under (attempt, step), and only the newest attempt is merged.

Merge state lives on the event loop. What evaluating a step needs of its job (hosts, the module
table, the clock) is copied into a JobSnapshot when the step is handed out, so the evaluation
thread never reads a dict that a Hello may be growing at the same moment.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field

import numpy as np

from modtrack.collector.config import ServeConfig
from modtrack.collector.records import (
    CLOCK_KIND_CPU,
    CLOCK_KIND_CUDA,
    INT64_MAX,
    INT64_MIN,
    N_PHASES,
    PHASE_IDS,
    StepMatrix,
    StepRow,
    column_key,
    idle_less_gc,
)
from modtrack.collector.small_arrays import median, nan_to


@dataclass
class RankState:
    host: str
    last_seen: float  # time.monotonic()
    state: str = "live"  # "live" | "missing"
    clock_offset_ns: int = 0
    counters: dict = field(default_factory=dict)
    clock_kind: int = 0  # protos ClockKind: how the rank times its modules (the detector's floor)
    waits_in_modules: bool = False  # its module durations hold its waits (CUDA events, wall-clock durations)


@dataclass
class PendingStep:
    first_seen: float
    rows: dict = field(default_factory=dict)  # rank -> StepRow


@dataclass(frozen=True)
class JobSnapshot:
    """A job as one step's evaluation sees it, taken on the event loop."""

    job: str
    names: list[str]  # job-wide module id -> name: a copy the loop never changes
    hosts: dict[int, str]  # rank -> host, for the ranks of this step
    cpu_clock: bool  # some rank times its modules on the CPU clock (the detector's floor)
    attempt: int = 0  # the job's attempt (torchelastic restarts) when the step was handed out


@dataclass
class ReadyStep:
    job: JobSnapshot
    step: int
    rows: dict  # rank -> StepRow
    lag_s: float  # first report -> evaluation
    attempt: int = 0


class JobState:
    """What the merge knows about one job: ranks, the job-wide module table, pending steps."""

    def __init__(
        self, job: str, world_size: int, names: list[str] | None = None, last_evaluated: int = -1, attempt: int = 0
    ):
        self.job = job
        self.world_size = world_size
        self.names: list[str] = list(names or [])
        self.ids: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        self.ranks: dict[int, RankState] = {}
        self.pending: dict[int, PendingStep] = {}
        self.last_evaluated = last_evaluated
        self.attempt = attempt  # the newest attempt (torchelastic restarts); only it is merged
        self.sessions: dict[int, tuple[int, str]] = {}  # rank -> (attempt, session) of its last hello
        self.cpu_clock = False
        self.last_activity = time.monotonic()  # latest Hello or report (or the restore)
        self.host_clocks: dict[str, tuple[int, int, int]] = {}  # host -> (rtt, offset, rank) of its best sample
        self._frozen_names: list[str] = []

    def attempt_of(self, rank: int, session: str, announced: int | None) -> int:
        """The attempt a rank's hello belongs to; a newer one starts the job's steps afresh.

        torchelastic's restart count when the agent sends it; else a rank that comes back with a
        new session (a new process) after one of this attempt is the next attempt, and the same
        session is a reconnect."""
        known = self.sessions.get(rank)
        if announced is not None:
            attempt = announced
        elif known is None or not session or not known[1]:
            attempt = self.attempt
        elif known[1] == session:
            attempt = known[0]
        else:
            attempt = max(self.attempt, known[0] + 1)
        self.sessions[rank] = (attempt, session)
        if attempt > self.attempt:
            self.attempt = attempt
            self.pending.clear()  # the old attempt's unfinished steps will never complete
            self.last_evaluated = -1
        return attempt

    def note_clock(self, rank: int, offset_ns: int, rtt_ns: int) -> None:
        """A rank's clock offset (and the round trip of its sample): the best of its host so far, when its
        round trip is the host's shortest (or it was that rank's already)."""
        host = self.ranks[rank].host
        best = self.host_clocks.get(host)
        if host and (best is None or rtt_ns < best[0] or best[2] == rank):
            self.host_clocks[host] = (rtt_ns, offset_ns, rank)

    def host_offset(self, rank: int) -> int:
        """The clock offset to line a rank's collectives up with: that of the rank of its host whose sample had
        the shortest round trip. The ranks of one host read one monotonic clock (the agent's perf_counter_ns),
        so their offsets differ only by their error, at most half their sample's round trip: on a busy host ms
        (0.7 vs 3.4 ms round trips, offsets 1.6 ms apart, on two ranks of one VM), as large as the waits."""
        info = self.ranks[rank]
        best = self.host_clocks.get(info.host) if info.host else None
        return info.clock_offset_ns if best is None else best[1]

    def add_rank(self, rank: int, info: RankState) -> None:
        self.ranks[rank] = info
        self.cpu_clock = self.cpu_clock or info.clock_kind == CLOCK_KIND_CPU

    def snapshot(self, ranks=None) -> JobSnapshot:
        """What evaluating a step of `ranks` (default: all known) needs; cheap per step: the
        name table is copied again only after it grew."""
        if len(self._frozen_names) != len(self.names):
            self._frozen_names = list(self.names)  # a new copy: the old one stays as snapshots saw it
        ranks = self.ranks if ranks is None else ranks
        hosts = {r: self.ranks[r].host for r in ranks if r in self.ranks}
        return JobSnapshot(self.job, self._frozen_names, hosts, self.cpu_clock, self.attempt)

    def module_ids(self, names: list[str]) -> tuple[np.ndarray, int, list[str]]:
        """Job-wide ids for a rank's names, adding the unseen ones. Returns (ids, first id
        added, names added) so the caller can persist the additions."""
        first_new = len(self.names)
        ids = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            jid = self.ids.get(name)
            if jid is None:
                jid = self.ids[name] = len(self.names)
                self.names.append(name)
            ids[i] = jid
        return ids, first_new, self.names[first_new:]

    def live_ranks(self) -> int:
        return sum(1 for r in self.ranks.values() if r.state == "live")


class Merger:
    def __init__(
        self,
        watermark_s: float = ServeConfig.watermark_s,
        missing_after_s: float = ServeConfig.missing_after_s,
        max_pending_steps: int = 10_000,
    ):
        self.watermark_s = watermark_s
        self.missing_after_s = missing_after_s
        self.max_pending_steps = max_pending_steps  # bounds memory if a rank races far ahead
        self.jobs: dict[str, JobState] = {}
        self.late_reports = 0

    def job(self, job: str, world_size: int) -> JobState:
        state = self.jobs.get(job)
        if state is None:
            state = self.jobs[job] = JobState(job, world_size)
        state.world_size = max(world_size, 1)
        return state

    def hello(
        self,
        job: str,
        rank: int,
        world_size: int,
        host: str,
        clock_kind: int = 0,
        session: str = "",
        attempt: int | None = None,
        wall_durations: bool = False,
    ) -> JobState:
        """Register a rank's stream; `state.sessions[rank][0]` is then the attempt it belongs to."""
        state = self.job(job, world_size)
        state.attempt_of(rank, session, attempt)
        waits_in_modules = wall_durations or clock_kind == CLOCK_KIND_CUDA
        info = RankState(
            host=host, last_seen=time.monotonic(), clock_kind=clock_kind, waits_in_modules=waits_in_modules
        )
        state.add_rank(rank, info)
        state.last_activity = time.monotonic()
        return state

    def add(self, row: StepRow) -> bool:
        """Queue one rank's step for merging; False when that step was already evaluated."""
        state = self.jobs[row.job]
        now = time.monotonic()
        rank = state.ranks[row.rank]
        rank.last_seen = state.last_activity = now
        rank.state = "live"
        if row.attempt != state.attempt or row.step <= state.last_evaluated:
            self.late_reports += 1
            return False
        pending = state.pending.get(row.step)
        if pending is None:
            pending = state.pending[row.step] = PendingStep(first_seen=now)
        pending.rows.setdefault(row.rank, row)  # a second report of the step: the store keeps the first, so do we
        return True

    def due(self, now: float) -> tuple[list[ReadyStep], list[tuple[str, int]]]:
        """Steps ready for evaluation (ascending per job) and ranks newly marked missing."""
        ready, missing = [], []
        for state in self.jobs.values():
            for rank, info in state.ranks.items():
                if info.state == "live" and now - info.last_seen > self.missing_after_s:
                    info.state = "missing"
                    missing.append((state.job, rank))
            if not state.pending:
                continue
            live = {r for r, info in state.ranks.items() if info.state == "live"}
            everyone_known = len(state.ranks) >= state.world_size
            for step in sorted(state.pending):
                pending = state.pending[step]
                complete = everyone_known and live <= pending.rows.keys()
                if not (
                    complete
                    or now - pending.first_seen >= self.watermark_s
                    or len(state.pending) > self.max_pending_steps
                ):
                    break
                del state.pending[step]
                state.last_evaluated = step
                ready.append(
                    ReadyStep(state.snapshot(pending.rows), step, pending.rows, now - pending.first_seen, state.attempt)
                )
        return ready, missing


def build_matrix(job: JobSnapshot | JobState, step: int, rows: dict[int, StepRow]) -> StepMatrix:
    """One step of one job as a rank x (module, phase) matrix of self times, with numpy."""
    state = job.snapshot(rows) if isinstance(job, JobState) else job
    ranks = sorted(rows)
    ordered = [rows[r] for r in ranks]
    lengths = np.fromiter((len(r.modules["module"]) for r in ordered), dtype=np.int64, count=len(ordered))
    modules = np.concatenate([r.modules["module"] for r in ordered]).astype(np.int64)
    phases = np.concatenate([r.modules["phase"] for r in ordered]).astype(np.int64)
    self_ns = np.concatenate([r.modules["self"] for r in ordered])
    keys = column_key(modules, phases)
    # Job-wide ids are dense, so a presence table finds the columns without sorting 10^6 keys.
    present = np.zeros(column_key(len(state.names) + 1, 0), dtype=bool)
    if len(keys) and keys.max() >= len(present):  # a name added since the table was read
        present = np.zeros(int(keys.max()) + 1, dtype=bool)
    present[keys] = True
    columns = np.flatnonzero(present)
    inverse = (np.cumsum(present) - 1)[keys]
    self_ms = np.full((len(ranks), len(columns)), np.nan)
    self_ms[np.repeat(np.arange(len(ranks)), lengths), inverse] = self_ns / 1e6
    # one conversion for the step figures of every rank (columns: _FIGURES)
    table = np.array([_step_figures(r.figures) for r in ordered], dtype=np.float64).reshape(len(ordered), len(_FIGURES))
    figures = {name: table[:, i] for i, name in enumerate(_FIGURES)}
    tail_ms = figures["backward_tail_ns"] / 1e6
    gc_ms = figures["gc_ns"] / 1e6
    # On the CPU clock a module's self time is compute only, so forward and backward wall minus all
    # module compute is what the rank waited, in whatever phase (FSDP all-gathers, DDP's tail).
    # Other clocks (CUDA events) cannot be subtracted from host walls: the backward tail it is.
    in_modules = (figures["forward_ns"] + figures["backward_ns"]) / 1e6 - nan_to(self_ms).sum(axis=1)  # np.nansum
    in_modules = idle_less_gc(in_modules, gc_ms)  # GC pauses are no wait
    # the agent's own figure (every micro-batch's gap under gradient accumulation); agents before it: what the
    # module stamps tell, the one gap between the last forward and the first backward
    host_ms = np.maximum(_loop_code_between_phases(ordered, lengths, phases, figures), figures["host_ns"]) / 1e6
    host_ms = np.minimum(host_ms, figures["data_ns"] / 1e6)
    host_wait_ms = _waits_for_peers(np.minimum(figures["host_wait_ns"] / 1e6, host_ms))
    every_detail = all(r.detail for r in ordered)
    detail = None if every_detail else np.array([r.detail for r in ordered], dtype=bool)  # sampled mode
    if not state.cpu_clock:
        idle_ms = tail_ms
    elif detail is None:
        idle_ms = np.maximum(in_modules, tail_ms)
    else:  # a step without detail has no module compute to subtract
        idle_ms = np.where(detail, np.maximum(in_modules, tail_ms), tail_ms)
    if state.cpu_clock:  # and what it waited for its peers in the loop's own code between the phases
        idle_ms = idle_ms + host_wait_ms
    return StepMatrix(
        job=state.job,
        step=step,
        ranks=np.array(ranks, dtype=np.int64),
        hosts=[state.hosts.get(r, "") for r in ranks],
        column_module=columns // N_PHASES,
        column_phase=columns % N_PHASES,
        self_ms=self_ms,
        wall_ms=(figures["end_ns"] - figures["start_ns"]) / 1e6,
        sync_wait_ms=tail_ms,
        forward_ms=figures["forward_ns"] / 1e6,
        backward_ms=figures["backward_ns"] / 1e6,
        module_names=state.names,
        data_ms=figures["data_ns"] / 1e6,
        optimizer_ms=figures["optimizer_ns"] / 1e6,
        gc_ms=gc_ms,
        idle_ms=idle_ms,
        attempt=state.attempt,
        detail=detail,
        cpu_clock=bool(state.cpu_clock),
        host_ms=host_ms,
        host_wait_ms=host_wait_ms if host_wait_ms.any() else None,
    )


def _waits_for_peers(host_wait_ms: np.ndarray) -> np.ndarray:
    """(R,) the part of each rank's blocked time in its loop's own code (StepReport.host_wait_ns) that was a wait
    for its peers: at most the ranks' median. A collective there (gradient clipping's all-reduce under FSDP) holds
    every rank until the last one arrives, and the last one waits least; a rank blocked longer than the median
    rank was blocked on its own (a slow write, a logger's network call): that is its own time, as computing is."""
    if len(host_wait_ms) < 2 or not host_wait_ms.any():
        return host_wait_ms
    return np.minimum(host_wait_ms, median(host_wait_ms))


_FIGURES = (
    "start_ns",
    "end_ns",
    "forward_ns",
    "backward_ns",
    "backward_tail_ns",
    "data_ns",
    "optimizer_ns",
    "gc_ns",
    "host_ns",
    "host_wait_ns",
)
_step_figures = operator.itemgetter(*_FIGURES)


def _pass_marks(ordered: list[StepRow], lengths: np.ndarray, phases: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per rank: the end of its last module forward, the start of its first module backward and the end of its
    last (INT64_MIN / INT64_MAX where it has none): records.pass_marks, for rows that do not carry them."""
    n = len(ordered)
    rank = np.repeat(np.arange(n), lengths)
    starts = np.concatenate([r.modules["first_start"] for r in ordered]).astype(np.int64) if n else np.zeros(0)
    ends = np.concatenate([r.modules["last_end"] for r in ordered]).astype(np.int64) if n else np.zeros(0)
    forward_end = np.full(n, INT64_MIN)
    backward_start = np.full(n, INT64_MAX)
    backward_end = np.full(n, INT64_MIN)
    fwd, bwd = phases == PHASE_IDS["forward"], phases == PHASE_IDS["backward"]
    np.maximum.at(forward_end, rank[fwd], ends[fwd])
    np.minimum.at(backward_start, rank[bwd], starts[bwd])
    np.maximum.at(backward_end, rank[bwd], ends[bwd])
    return forward_end, backward_start, backward_end


def _loop_code_between_phases(
    ordered: list[StepRow], lengths: np.ndarray, phases: np.ndarray, figures: dict[str, np.ndarray]
) -> np.ndarray:
    """Per rank (ns): the host's own code in the training loop between the step's phases, none of it data loading:
    from the end of its last module forward to the start of its backward pass (the loss, a user's code), and
    from the end of the pass to the start of the optimizer step (gradient clipping, `loss.item()`, logging).

    The pass starts where the training loop called backward (agents since FSDP's pre-backward all-gathers were
    seen in that gap), which the report gives only as a difference: the pass ends its tail after the last module
    backward, and lasts backward_ns. Older agents start the pass at its first module backward: the same figure.
    0 where the step has no such gap (several forwards and backwards, gradient accumulation: they interleave)."""
    if all(r.pass_marks is not None for r in ordered):  # worked out at ingest, from the report's own lists
        marks = np.array([r.pass_marks for r in ordered], np.int64).reshape(len(ordered), 3)
        forward_end, backward_start, backward_end = marks[:, 0], marks[:, 1], marks[:, 2]
    else:
        forward_end, backward_start, backward_end = _pass_marks(ordered, lengths, phases)
    both = (forward_end > INT64_MIN) & (backward_start < INT64_MAX)
    pass_end = backward_end + figures["backward_tail_ns"].astype(np.int64)
    pass_start = np.where(
        both & (figures["backward_ns"] > 0), pass_end - figures["backward_ns"].astype(np.int64), backward_start
    )
    between = np.where(both, np.maximum(np.minimum(backward_start, pass_start) - forward_end, 0), 0)
    # The step ends where its (last) optimizer step does, so the optimizer began optimizer_ns before its end
    # (contiguous unless a closure ran inside it: then the pass is inside the optimizer's window and this is < 0).
    optimizer_start = figures["end_ns"].astype(np.int64) - figures["optimizer_ns"].astype(np.int64)
    has_both = (backward_end > INT64_MIN) & (figures["optimizer_ns"] > 0)
    # (pass_end read only where there is a pass: INT64_MIN plus a tail would wrap in the subtraction)
    after = np.where(has_both, np.maximum(optimizer_start - np.where(has_both, pass_end, 0), 0), 0)
    return (between + after).astype(np.float64)
