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

Waits inside module windows: on CPU a module's durations are the thread's CPU time, so a rank blocked in a
gloo collective inside a module does not accrue time there: nothing to take out. On CUDA a module's window
holds the collectives it issues (FSDP's all-gathers, TP's all-reduces): per rank and step, the wait
computed here (not the transfer) is what that rank waited for its peers, inside its module windows: the
evaluator raises each rank's idle time to it (with_collective_waits), so that a victim blocked in an
all-gather is seen waiting, the culprit is not, and the cost counts the wait. Taking it out of the very
module that waited needs the module open when the wait ended, which the agent does not send; FSDP's
prefetching issues an all-gather in one module and waits for it in the next.

Memory: the newest `keep_steps` steps per job, at most `max_groups` groups per job; all in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.core import GaugeMetricFamily

from modtrack.collector.ingest.collectives_parse import GroupStep

LATE_SHARE = 0.6  # a rank arriving last in at least this share of a group's collectives is "the late rank"
MIN_WAIT_NS = 1_000_000  # ...when its peers wait at least this much per step on average
SLOW_LINK_RATIO = 1.5  # a group's transfer per byte over the median of its peer groups'
_NO_WAITS = (np.zeros(0, np.int64), np.zeros(0))


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
        wait = (active - floor).sum(axis=1)
        transfer = int(floor.sum())
        active_sum = active.sum(axis=1)
    else:
        last = (arrival == latest).sum(axis=1)
        wait = (latest - arrival).sum(axis=1)
        transfer = 0
        active_sum = None
    return LinedUp(ranks, wait, last, n, active_sum, transfer, max(s.bytes for s in steps))


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
            state.version += 1
            oldest = state.newest - self.keep_steps
            for group in state.groups.values():
                for step in [st for st in group.steps if st <= oldest]:
                    del group.steps[step]

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

    def collect(self) -> Iterator[GaugeMetricFamily]:
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
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            for g in self.summary(job)["groups"]:
                labels = [job, g["group"]]
                late.add_metric(labels, -1 if g["late_rank"] is None else g["late_rank"])
                wait.add_metric(labels, g["peer_wait_ms"] / 1e3)
                if g["transfer_ms"] is not None:
                    transfer.add_metric(labels, g["transfer_ms"] / 1e3)
        yield late
        yield wait
        yield transfer


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


def with_collective_waits(idle_ms: np.ndarray, step_ranks: np.ndarray, ranks: np.ndarray, waits_ms: np.ndarray):
    """A step's per-rank wait (`idle_ms`, in step_ranks' order) raised to what the ranks lately waited in
    collectives. Where module durations hold the waits (CUDA events; host wall time), a rank blocked in an
    FSDP all-gather inside a module window shows no idle time at all, and only the collectives tell how long
    its peers waited for the culprit: the cost of a verdict, and whether a rank slow in data loading or the
    optimizer kept anyone waiting. On the thread CPU clock idle time already holds it (never less)."""
    at = np.minimum(np.searchsorted(ranks, step_ranks), len(ranks) - 1)  # `ranks`: sorted, not empty
    recent = np.where(ranks[at] == step_ranks, waits_ms[at], 0.0)
    return np.maximum(np.nan_to_num(np.asarray(idle_ms, dtype=np.float64)), recent)
