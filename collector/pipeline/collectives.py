"""Collectives lined up across the ranks of each process group: who arrives last, and which link is slow.

Each rank reports, per step and process group, every collective's sequence number and issue time (and on
NCCL its active GPU time); see agent/collectives.py. A collective can only finish once its last rank has
arrived, so for collective k of a group:
- arrival skew: wait[r, k] = max over ranks of arrival[:, k] - arrival[r, k], arrivals on the collector's
  clock (issue time + the rank's clock offset). On gloo the host call is the arrival (CPU work is
  synchronous); the culprit arrives last and waits least.
- NCCL: the host call runs ahead of the GPU, so arrival is read on the GPU instead: a kernel that started
  early spins until its peers join, so wait[r, k] = active[r, k] - min over ranks of active[:, k], and
  transfer[k] = min over ranks of active[:, k] (the time even the last to arrive spends in it).
- a slow link: a group whose transfer time (per byte, where bytes are known) is well above that of the
  other groups of the same size. Needs active time: NCCL only.

Waits inside module windows. On the thread CPU clock (the CPU default) a rank blocked in a gloo collective
inside a module accrues no time there: nothing to take out. Where module durations hold the waits (CUDA events;
wall-clock durations, which the Hello announces), a victim blocked in an FSDP all-gather or a TP all-reduce shows
the wait as compute of the module it waited in, and module times alone blame it. So, per rank and step, the
time each module x phase spent waiting is taken out of that module's self time before ranks are compared
(without_module_waits) and counted as the rank's idle time; per rank, idle time is also raised to its total
wait (with_collective_waits: waits outside module windows, in data loading or the optimizer).

Where that is computed, and why here: how long a rank waited in a collective is known only across ranks (the
arrival skew by sequence number), so only the collector has it; which module held the wait needs the rank's
module windows, which its step report already carries (first start and last end per module and phase, exact for
a module called once in the phase; each call's window for a module called several times, PhaseStats.call_start_ns,
sent where collective timing is on and durations hold waits), so no per-collective wire field is needed
(Hello.wall_durations says whether durations hold waits). The agent could not do better from what
torch gives it: the Flight Recorder (gloo) stamps only the call, never when the rank blocked or unblocked, and
FSDP's prefetch issues an all-gather in one module and blocks on it in the next. A wait is the span from the
rank's arrival to the moment it could go on: on gloo, when the last rank arrived (the host blocks); on NCCL,
when its kernel ended (issued on an idle collective stream, it started at the call and spun `wait` of its
`active` time). It is held by the innermost window open when it ended, and only since the rank last entered
that window's own code (since the window began, or since its latest child ended); waits that overlap (several
collectives in flight) count once (waits_in_windows). A step is evaluated with its own waits: the evaluator
holds a due step until every rank's stats of it are in (at most COLLECTIVE_HOLD_S). Not covered: a module
called several times in a phase by an agent that sent no call windows (its first start and last end are not one
window: its waits stay in it), and on NCCL a kernel queued behind earlier collectives on its stream (it starts
later than issued). The NCCL placement is unproven on a GPU.

Memory: the newest `keep_steps` steps per job, at most `max_groups` groups per job, and the module windows of
the newest `keep_steps` steps of ranks whose durations hold waits (3 int64 per window: per module x phase called
once, per call of one called several times); all in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from modtrack.collector.ingest.collectives_parse import GroupStep
from modtrack.collector.records import INT64_MAX, INT64_MIN, column_key
from modtrack.collector.small_arrays import nan_to

LATE_SHARE = 0.6  # a rank arriving last in at least this share of a group's collectives is "the late rank"
MIN_WAIT_NS = 1_000_000  # ...when its peers wait at least this much per step on average
SLOW_LINK_RATIO = 1.5  # a group's transfer per byte over the median of its peer groups'
_NO_WAITS = (np.zeros(0, np.int64), np.zeros(0))
_NO_MODULE_WAITS = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))


@dataclass
class LinedUp:
    """One complete (step, group): every member's collectives that all members listed, lined up."""

    ranks: np.ndarray  # int, sorted
    wait_ns: np.ndarray  # per rank: summed wait before the collectives could run
    last: np.ndarray  # per rank: how many of the collectives it arrived last at
    collectives: int  # lined up (listed by every member)
    active_ns: np.ndarray | None  # per rank: summed active time (NCCL), else None
    transfer_ns: int  # summed over collectives: min active over ranks (NCCL), else 0
    bytes: int  # the group's bytes in the step (max over members)
    waits: np.ndarray | None = None  # (ranks, collectives): each rank's wait in each collective
    ends: np.ndarray | None = None  # (ranks, collectives): when that wait ended, collector clock


def line_up(members: dict[int, tuple[GroupStep, int]]) -> LinedUp | None:
    """members: rank -> (its GroupStep, its clock offset ns). None when no collective is common to all."""
    ranks = np.array(sorted(members), dtype=np.int64)
    steps = [members[int(r)][0] for r in ranks]
    common = steps[0].seq
    for s in steps[1:]:
        common = np.intersect1d(common, s.seq)
    if not len(common):
        return None
    n = len(common)
    arrival = np.empty((len(ranks), n), np.int64)
    measured = all(s.active_measured and s.active_ns is not None for s in steps)
    active = np.empty((len(ranks), n), np.int64) if measured else None
    for i, s in enumerate(steps):
        _, at, _ = np.intersect1d(s.seq, common, return_indices=True)  # `common` is sorted: so are these
        arrival[i] = s.issue_ns[at] + members[int(ranks[i])][1]
        if active is not None:
            active[i] = s.active_ns[at]  # type: ignore[index]
    latest = arrival.max(axis=0)
    if active is not None:  # the GPU's arrival: the kernel that waited least started last
        floor = active.min(axis=0)
        last = (active == floor).sum(axis=1)
        waits = active - floor
        ends = arrival + active  # a kernel starts when issued (its stream idle) and ends `active` later
        transfer = int(floor.sum())
        active_sum = active.sum(axis=1)
    else:
        last = (arrival == latest).sum(axis=1)
        waits = latest - arrival
        ends = np.broadcast_to(latest, arrival.shape)  # the host is blocked until the last rank comes in
        transfer = 0
        active_sum = None
    wait = waits.sum(axis=1)
    return LinedUp(ranks, wait, last, n, active_sum, transfer, max(s.bytes for s in steps), waits, ends)


@dataclass
class Windows:
    """One rank's module windows of one step, on the collector's clock: one per call (a module called several
    times in a phase has several windows of one column)."""

    columns: np.ndarray  # int64 column keys (records.column_key), one per window
    start: np.ndarray  # int64 ns: the call's start
    end: np.ndarray  # int64 ns: its end


def windows_of(modules: dict, offset_ns: int) -> Windows:
    """A StepRow's module columns as windows: one per module called once in its phase (its first start and
    last end), and one per call of a module called several times, from the calls' own windows the report
    carries (PhaseStats.call_start_ns). Without those, such a module's first start and last end are not one
    window (they span the code between its calls): it is left out and its waits stay where they are."""
    keys = column_key(np.asarray(modules["module"], np.int64), np.asarray(modules["phase"], np.int64))
    once = np.asarray(modules["calls"]) == 1
    owner = modules.get("call_owner")
    if owner is None or not len(owner):
        return Windows(
            keys[once],
            np.asarray(modules["first_start"], np.int64)[once] + offset_ns,
            np.asarray(modules["last_end"], np.int64)[once] + offset_ns,
        )
    return Windows(
        np.concatenate([keys[once], keys[np.asarray(owner, np.int64)]]),
        np.concatenate([np.asarray(modules["first_start"], np.int64)[once], modules["call_start"]]) + offset_ns,
        np.concatenate([np.asarray(modules["last_end"], np.int64)[once], modules["call_end"]]) + offset_ns,
    )


def resumed_at(w: Windows, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """When each wait [starts[k], ends[k]) really ended on the rank's own timeline. Its end is another rank's
    arrival moved onto this rank's clock through both clock offsets, which may be off by ms (1.6 ms between two
    ranks of one busy host, before they shared the host's offset): taken as it is, a wait measured late falls
    into the rank's next module, is held there since that began, and most of it is lost. A rank blocked in a
    collective starts and ends no module window, so it was blocked in the stretch between two window events
    (starts, ends) that overlaps the wait most, and it resumed when that stretch ended: the wait ends there when
    that is before its measured end. A wait measured early keeps its end: what the rank did after it (FSDP's
    copy-out of the gathered shards) cannot be told from compute, and taking it out of the waiting rank only
    makes the rank it waited for look slower there."""
    events = np.unique(np.concatenate([w.start, w.end]))
    lo = np.r_[INT64_MIN, events]
    hi = np.r_[events, INT64_MAX]
    overlap = np.minimum(hi[None, :], ends[:, None]) - np.maximum(lo[None, :], starts[:, None])
    return np.minimum(hi[np.argmax(overlap, axis=1)], ends)


def waits_in_windows(w: Windows, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The part of each wait [starts[k], ends[k]) that one rank spent in its module windows' own code, per
    column: (columns, ns), columns unique. A wait is held by the innermost window open when it ended (when the
    rank resumed, resumed_at: where it was blocked), and only since the rank last entered that window's own
    code: since it began, or since its latest child ended, whichever came last (an all-gather FSDP prefetched in
    one module and waited for in the next is counted in the next, from its start). Waits overlapping in one
    window count once."""
    if not len(w.columns) or not len(ends):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ends = resumed_at(w, starts, ends)
    e = ends[:, None] - 1  # the rank was blocked until it resumed: where it was the moment before
    inside = (w.start <= e) & (e < w.end)
    held = inside.any(axis=1)
    if not held.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    none = INT64_MIN
    inner = np.argmax(np.where(inside, w.start, none), axis=1)  # nested windows: the innermost began last
    begun = w.start[inner]
    child_ended = np.where((w.end <= e) & (w.start >= begun[:, None]), w.end, none).max(axis=1)
    since = np.maximum(np.maximum(starts, begun), child_ended)
    keep = held & (ends > since)
    col, since, until = inner[keep], since[keep], ends[keep]
    if not len(col):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # one window's waits may overlap (collectives in flight together): the length of their union
    order = np.lexsort((since, col))
    col, since, until = col[order], since[order], until[order]
    base = since.min()
    group = np.cumsum(np.r_[True, col[1:] != col[:-1]]) - 1
    span = int(until.max() - base) + 1
    running = np.maximum.accumulate(until - base + group * span)  # a running max that restarts per window
    before = np.r_[INT64_MIN, running[:-1]]
    before = np.where(np.r_[True, col[1:] != col[:-1]], INT64_MIN, before - group * span + base)
    counted = np.maximum(until - np.maximum(since, before), 0)
    columns, at = np.unique(w.columns[col], return_inverse=True)
    return columns, np.bincount(at, weights=counted, minlength=len(columns)).astype(np.int64)


@dataclass
class _Group:
    group: str
    backend: str
    size: int
    ranks_hash: int
    steps: dict[int, dict[int, tuple[GroupStep, int]]] = field(default_factory=dict)  # step -> rank -> (stats, offset)


@dataclass
class _Job:
    attempt: int = 0
    groups: dict[tuple[str, int], _Group] = field(default_factory=dict)
    newest: int = -1
    groups_refused: int = 0  # groups past max_groups: not kept
    version: int = 0  # bumped by every add: a summary is computed once per version
    summary: tuple[int, int, dict] | None = None  # (version, last, answer)
    waits: tuple[int, int, tuple] | None = None  # (version, last, recent_waits' answer)
    # ranks whose module durations hold their waits (CUDA events, wall clock): step -> rank -> module windows
    windows: dict[int, dict[int, Windows]] = field(default_factory=dict)
    newest_windows: int = -1
    in_windows: dict[int, tuple | None] = field(default_factory=dict)  # step -> its waits in windows (or None)
    module_waits: tuple[tuple, tuple] | None = None  # ((version, step, last), recent_module_waits' answer)
    stats_newest: dict[int, int] = field(default_factory=dict)  # rank -> the newest step it sent stats of


class CollectiveBook:
    """Every job's recent collective stats, per group and step, and the verdicts drawn from them."""

    def __init__(self, keep_steps: int = 64, max_groups: int = 64) -> None:
        self.keep_steps = keep_steps
        self.max_groups = max_groups
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()  # ingest writes on the loop; scrapes and API reads on other threads

    def add(self, job: str, attempt: int, rank: int, offset_ns: int, stats: list[GroupStep]) -> None:
        """One rank's stats (of one report); a replayed report replaces what it said before."""
        with self._lock:
            state = self._jobs.get(job)
            if state is None or state.attempt != attempt:
                state = self._jobs[job] = _Job(attempt)
            for s in stats:
                key = (s.group, s.ranks_hash)
                group = state.groups.get(key)
                if group is None:
                    if len(state.groups) >= self.max_groups:
                        state.groups_refused += 1
                        continue
                    group = state.groups[key] = _Group(s.group, s.backend, s.group_size, s.ranks_hash)
                group.steps.setdefault(s.step, {})[rank] = (s, offset_ns)
                state.newest = max(state.newest, s.step)
                state.in_windows.pop(s.step, None)
                state.stats_newest[rank] = max(state.stats_newest.get(rank, -1), s.step)
            state.version += 1
            oldest = state.newest - self.keep_steps
            for group in state.groups.values():
                for step in [st for st in group.steps if st <= oldest]:
                    del group.steps[step]
            for step in [st for st in state.in_windows if st <= oldest]:
                del state.in_windows[step]

    def restore(self, job: str, attempt: int, rows: list[tuple[int, int, GroupStep]]) -> None:
        """Stored stats ((rank, clock offset, stats) in step order, Store.collective_stats) read back after a restart,
        as the reports that carried them had added them."""
        reports: dict[tuple[int, int, int], list[GroupStep]] = {}
        for rank, offset, s in rows:
            reports.setdefault((s.step, rank, offset), []).append(s)
        for (_, rank, offset), stats in reports.items():
            self.add(job, attempt, rank, offset, stats)

    def add_windows(self, job: str, attempt: int, rank: int, offset_ns: int, step: int, modules: dict) -> None:
        """One rank's module windows of a step, from a rank whose module durations hold its waits: where each of
        its collective waits of that step happened. Kept for the newest `keep_steps` steps."""
        with self._lock:
            state = self._jobs.get(job)
            if state is None or state.attempt != attempt:
                state = self._jobs[job] = _Job(attempt)
            state.windows.setdefault(step, {})[rank] = windows_of(modules, offset_ns)
            state.in_windows.pop(step, None)
            state.newest_windows = max(state.newest_windows, step)
            oldest = state.newest_windows - self.keep_steps
            if len(state.windows) > self.keep_steps:
                for old in [st for st in state.windows if st <= oldest]:
                    del state.windows[old]

    def knows(self, job: str) -> bool:
        """Some rank of `job` sent collective stats (of its current attempt or an earlier one)."""
        return job in self._jobs

    def step_in(self, job: str, step: int) -> bool:
        """Every rank whose module windows of `step` are known and that sends collective stats has sent those of
        that step (stats of a later step say so too: a step's stats come whole, in step order). True when no
        window is known; a rank that never sent stats (collective timing off there) is not waited for."""
        with self._lock:
            state = self._jobs.get(job)
            if state is None or not state.windows.get(step):
                return True
            return all(state.stats_newest.get(r, step) >= step for r in state.windows[step])

    def forget(self, job: str) -> None:
        with self._lock:
            self._jobs.pop(job, None)

    def _complete(self, group: _Group, last: int) -> list[tuple[int, LinedUp]]:
        out = []
        for step in sorted(group.steps)[::-1]:
            members = group.steps[step]
            if len(members) < group.size:
                continue  # a member has not told this step yet
            lined = line_up(members)
            if lined is not None:
                out.append((step, lined))
            if len(out) >= last:
                break
        return out

    def summary(self, job: str, last: int = 20) -> dict:
        """The API's answer: per group, over its newest `last` complete steps, per rank and the verdicts."""
        with self._lock:
            state = self._jobs.get(job)
            if state is None:
                return {"job": job, "groups": []}
            cached, version = state.summary, state.version
            if cached is not None and cached[:2] == (version, last):
                return cached[2]  # explain() asks once per active episode per evaluated step
            groups = [(g, self._complete(g, last)) for g in state.groups.values()]
        out = [_group_summary(g, steps) for g, steps in groups if steps]
        _mark_slow_links(out)
        answer = {"job": job, "groups": sorted(out, key=lambda g: g["group"])}
        with self._lock:
            if self._jobs.get(job) is state:
                state.summary = (version, last, answer)
        return answer

    def explain(self, episode) -> str:
        """What the collectives say about an episode's culprit, or "": the group where it is the late rank (its
        peers wait for it there), or a slow link among the groups it belongs to."""
        culprits = set(episode.ranks if episode.rank < 0 else [episode.rank])
        parts = []
        for g in self.summary(episode.job)["groups"]:
            members = {r["rank"] for r in g["ranks"]}
            if g["late_rank"] in culprits:
                share = next(r["last_share"] for r in g["ranks"] if r["rank"] == g["late_rank"])
                parts.append(
                    f"last into {share:.0%} of group {g['group']}'s collectives; "
                    f"its peers wait {g['peer_wait_ms']:.1f} ms per step there"
                )
            elif g["slow_link"] and culprits & members:
                parts.append(f"group {g['group']}'s link is slow ({g['transfer_ms']:.1f} ms per step in transfers)")
        return "; ".join(parts)

    def recent_waits(self, job: str, last: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """Per rank, the ms per step it waited in collectives lately: in each group the median over its newest
        `last` complete steps, summed over groups. (ranks, ms), both empty when no group has a complete step.

        Stats of a step arrive a report or a Flight Recorder dump (about a second) after the step itself, so
        an evaluated step is judged with its predecessors' waits."""
        with self._lock:
            state = self._jobs.get(job)
            if state is None:
                return _NO_WAITS
            cached = state.waits
            if cached is not None and cached[:2] == (state.version, last):
                return cached[2]
            version = state.version
            lined = [[w for _, w in self._complete(g, last)] for g in state.groups.values()]
        ranks_parts, waits_parts = [], []
        answer: tuple[np.ndarray, np.ndarray] = _NO_WAITS
        for steps in lined:
            if steps:
                ranks_parts.append(steps[0].ranks)
                waits_parts.append(np.median(np.stack([w.wait_ns for w in steps]), axis=0) / 1e6)
        if ranks_parts:
            ranks, at = np.unique(np.concatenate(ranks_parts), return_inverse=True)
            waits = np.bincount(at, weights=np.concatenate(waits_parts), minlength=len(ranks))
            answer = (ranks, waits)
        with self._lock:
            if self._jobs.get(job) is state:
                state.waits = (version, last, answer)
        return answer

    def module_waits(self, job: str, step: int, last: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per (rank, module x phase), the ms the rank waited in collectives inside that window in `step`; where
        that step's stats are not all in (the evaluator holds a step for them a while; a rank's last steps' stats
        may never come), the least over the newest `last` earlier steps that are (a step without a wait there
        counts 0): a persistent wait, not the noise of one step. (ranks, column keys, ms); empty where no rank's
        durations hold its waits (thread CPU time) or nothing is known yet."""
        with self._lock:
            state = self._jobs.get(job)
            if state is None or not state.windows:
                return _NO_MODULE_WAITS
            key = (state.version, step, last)
            cached = state.module_waits
            if cached is not None and cached[0] == key:
                return cached[1]
            steps: list[tuple] = []
            for at in sorted((s for s in state.windows if s <= step), reverse=True):
                if at not in state.in_windows:
                    state.in_windows[at] = _step_in_windows(state, at)
                found = state.in_windows[at]
                if found is not None:
                    steps.append(found)
                    if at == step:
                        break  # the step's own
                if len(steps) >= last:
                    break
            own = state.in_windows.get(step)
        answer = _least_over_steps([own] if own is not None else steps)
        with self._lock:
            if self._jobs.get(job) is state:
                state.module_waits = (key, answer)
        return answer

    def collect(self) -> Iterator[Metric]:
        """prometheus_client custom collector: a few series per job and group (never per rank)."""
        late = GaugeMetricFamily(
            "modtrack_collective_late_rank",
            "The rank that arrives last at most of the group's recent collectives while its peers wait (-1: none).",
            labels=["job", "group"],
        )
        wait = GaugeMetricFamily(
            "modtrack_collective_peer_wait_seconds",
            "Per step, the mean time the group's ranks other than the late one wait in its collectives.",
            labels=["job", "group"],
        )
        transfer = GaugeMetricFamily(
            "modtrack_collective_transfer_seconds",
            "Per step, the group's collective time once every rank is in (NCCL only).",
            labels=["job", "group"],
        )
        refused = CounterMetricFamily(
            "modtrack_collective_groups_refused",
            f"Process groups past the limit of {self.max_groups} per job: their collectives are not kept.",
            labels=["job"],
        )
        with self._lock:
            jobs = {job: state.groups_refused for job, state in self._jobs.items()}
        for job, n in jobs.items():
            if n:
                refused.add_metric([job], n)
            for g in self.summary(job)["groups"]:
                labels = [job, g["group"]]
                late.add_metric(labels, -1 if g["late_rank"] is None else g["late_rank"])
                wait.add_metric(labels, g["peer_wait_ms"] / 1e3)
                if g["transfer_ms"] is not None:
                    transfer.add_metric(labels, g["transfer_ms"] / 1e3)
        yield late
        yield wait
        yield transfer
        yield refused


def _step_in_windows(state: _Job, step: int) -> tuple | None:
    """A step's waits inside module windows, (ranks, column keys, ns), from every group complete in it; None when
    none is (its stats are not all in yet). Runs under the book's lock: one step's few collectives per rank."""
    windows = state.windows.get(step, {})
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    complete = False
    for group in state.groups.values():
        members = group.steps.get(step)
        if members is None or len(members) < group.size:
            continue
        lined = line_up(members)
        if lined is None or lined.waits is None or lined.ends is None:
            continue
        complete = True
        for i, r in enumerate(lined.ranks.tolist()):
            if r in windows:
                waited = lined.waits[i] > 0
                parts.setdefault(r, []).append((lined.ends[i][waited] - lined.waits[i][waited], lined.ends[i][waited]))
    if not complete:
        return None
    ranks, columns, ns = [], [], []
    for r, spans in parts.items():
        cols, waited = waits_in_windows(
            windows[r], np.concatenate([a for a, _ in spans]), np.concatenate([b for _, b in spans])
        )
        ranks.append(np.full(len(cols), r, np.int64))
        columns.append(cols)
        ns.append(waited)
    if not ranks:
        return _NO_MODULE_WAITS
    return np.concatenate(ranks), np.concatenate(columns), np.concatenate(ns)


def _least_over_steps(steps: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (rank, column), the least over the steps of its ns (0 in a step that does not list it), in ms."""
    if not steps or not sum(len(s[0]) for s in steps):
        return _NO_MODULE_WAITS
    ranks = np.concatenate([s[0] for s in steps])
    columns = np.concatenate([s[1] for s in steps])
    which = np.concatenate([np.full(len(s[0]), i) for i, s in enumerate(steps)])
    pairs, at = np.unique(np.stack([ranks, columns], axis=1), axis=0, return_inverse=True)
    dense = np.zeros((len(pairs), len(steps)))
    dense[at.ravel(), which] = np.concatenate([s[2] for s in steps])
    return pairs[:, 0], pairs[:, 1], dense.min(axis=1) / 1e6


def without_module_waits(matrix, ranks: np.ndarray, columns: np.ndarray, waits_ms: np.ndarray) -> None:
    """Take each rank's recent waits inside module windows (recent_module_waits) out of those windows' self time
    in a StepMatrix, never below 0, and count what was taken as the rank's idle time: module durations that hold
    the waits (CUDA events, wall clock) then show compute, and a victim blocked in an all-gather its peer issued
    late is no longer slow in the module that waited."""
    keys = column_key(matrix.column_module, matrix.column_phase)
    order = np.argsort(keys, kind="stable")
    at_col = np.minimum(np.searchsorted(keys[order], columns), len(keys) - 1)
    at_rank = np.minimum(np.searchsorted(matrix.ranks, ranks), len(matrix.ranks) - 1)
    ok = (keys[order][at_col] == columns) & (matrix.ranks[at_rank] == ranks) if len(keys) else np.zeros(0, bool)
    rows, cols = at_rank[ok], order[at_col[ok]]
    current = matrix.self_ms[rows, cols]
    taken = np.where(np.isnan(current), 0.0, np.minimum(nan_to(current), waits_ms[ok]))
    matrix.self_ms[rows, cols] = current - taken
    idle = matrix.idle_or_tail_ms  # a new array: the matrix's own is replaced below, not changed in place
    np.add.at(idle, rows, taken)
    matrix.idle_ms = idle


def _group_summary(group: _Group, steps: list[tuple[int, LinedUp]]) -> dict:
    ranks = steps[0][1].ranks
    n = len(steps)
    same = [lined for _, lined in steps if np.array_equal(lined.ranks, ranks)]
    wait = np.sum([lined.wait_ns for lined in same], axis=0)
    last = np.sum([lined.last for lined in same], axis=0)
    collectives = sum(lined.collectives for lined in same)
    measured = all(lined.active_ns is not None for lined in same)
    active = np.sum([lined.active_ns for lined in same if lined.active_ns is not None], axis=0) if measured else None
    share = last / max(collectives, 1)
    late = int(np.argmax(share))
    peers = np.delete(wait, late)
    peer_wait = float(peers.mean()) / len(same) if len(peers) else 0.0
    is_late = share[late] >= LATE_SHARE and peer_wait >= MIN_WAIT_NS and wait[late] == wait.min()
    transfer = sum(lined.transfer_ns for lined in same) / len(same) if measured else None
    nbytes = sum(lined.bytes for lined in same) / len(same)
    return {
        "group": group.group,
        "backend": group.backend,
        "size": group.size,
        "steps": n,
        "first_step": steps[-1][0],
        "last_step": steps[0][0],
        "active_measured": measured,
        "collectives_per_step": collectives / len(same),
        "bytes_per_step": nbytes,
        "late_rank": int(ranks[late]) if is_late else None,
        "peer_wait_ms": peer_wait / 1e6,
        "transfer_ms": None if transfer is None else transfer / 1e6,
        "slow_link": False,
        "ranks": [
            {
                "rank": int(r),
                "wait_ms": float(w) / len(same) / 1e6,
                "last_share": float(s),
                "active_ms": None if active is None else float(a) / len(same) / 1e6,
            }
            for r, w, s, a in zip(ranks, wait, share, active if active is not None else [None] * len(ranks))
        ],
    }


def _mark_slow_links(groups: list[dict]) -> None:
    """A group whose transfer time (per byte when known) is SLOW_LINK_RATIO over the median of the other
    groups of its size: its link is slow (every member spends long in it, the last to arrive too)."""
    timed = [g for g in groups if g["transfer_ms"] is not None]
    for g in timed:
        peers = [p for p in timed if p is not g and p["size"] == g["size"]]
        if not peers:
            continue

        def cost(x: dict) -> float:
            return x["transfer_ms"] / x["bytes_per_step"] if x["bytes_per_step"] else x["transfer_ms"]

        median = float(np.median([cost(p) for p in peers]))
        g["slow_link"] = median > 0 and cost(g) >= SLOW_LINK_RATIO * median


def take_out_waits(matrix, module_waits: tuple, recent_waits: tuple) -> None:
    """A step's collective waits applied to its StepMatrix before ranks are compared, as the evaluator (and a
    replay of a stored job) does: the waits inside module windows (CollectiveBook.module_waits) out of module
    compute, and each rank's idle time raised to what it lately waited (CollectiveBook.recent_waits)."""
    ranks, columns, in_windows = module_waits
    if len(ranks):
        without_module_waits(matrix, ranks, columns, in_windows)
    ranks, waits = recent_waits
    if len(ranks):
        matrix.idle_ms = with_collective_waits(matrix.idle_or_tail_ms, matrix.ranks, ranks, waits)


def with_collective_waits(idle_ms: np.ndarray, step_ranks: np.ndarray, ranks: np.ndarray, waits_ms: np.ndarray):
    """A step's per-rank wait (`idle_ms`, in step_ranks' order) raised to what the ranks lately waited in
    collectives. Where module durations hold the waits (CUDA events; host wall time), a rank blocked in an
    FSDP all-gather inside a module window shows no idle time at all, and only the collectives tell how long
    its peers waited for the culprit: the cost of a verdict, and whether a rank slow in data loading or the
    optimizer kept anyone waiting. On the thread CPU clock idle time already holds it (never less)."""
    at = np.minimum(np.searchsorted(ranks, step_ranks), len(ranks) - 1)  # `ranks`: sorted, not empty
    recent = np.where(ranks[at] == step_ranks, waits_ms[at], 0.0)
    return np.maximum(nan_to(idle_ms), recent)
