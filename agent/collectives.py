"""Collective timing per rank and process group, gathered on the sender thread, never in the training loop.

What torch 2.13 offers, without touching the user's code (DDP's reducer and FSDP call the process group
from C++ or through torch.distributed, so wrapping Python functions would miss most collectives):
- NCCL: ProcessGroup._register_on_completion_hook. With collective timing on (TORCH_NCCL_ENABLE_TIMING, or
  pg._enable_collectives_timing(), which we call), torch's hook thread calls us once per finished work with
  a WorkInfo: op_type, seq, time_started (host time the collective was called), time_finished (when the
  watchdog saw it done) and active_duration (CUDA events around the kernel). The hook appends a tuple to a
  bounded deque; everything else happens here, on the sender thread. No sizes (bytes is 0 on NCCL).
  One hook per group: a group whose hook is taken already (by the user) falls back to the Flight Recorder.
- gloo (and every other backend): no completion hook ("Only ProcessGroupNCCL supports onCompletion hook")
  and no Work duration ("This Backend doesn't support getDuration"). The Flight Recorder records gloo
  collectives (TORCH_FR_BUFFER_SIZE entries, 2000 by default, 0 turns it off): profiling name, sequence
  number, group, input sizes and dtypes, and time_created_ns (host time of the call), never a start or end.
  So on gloo we send when each rank called each collective, and bytes; the collector lines the ranks up by
  sequence number (arrival skew). Reading it costs: torch dumps the whole ring each time (about 10-40 µs
  per entry, partly holding the GIL), so dumps are rate limited to keep their cost under 1 % of the time.
All of it runs only with MODTRACK_COLLECTIVES=on: torch asks that every group with a completion hook be
destroyed before exit (its hook thread takes the GIL), and the NCCL path is not proven on a GPU yet.

A collective belongs to the step whose window [start, end) holds its issue time. A step is final once
every source has seen past its end (the Flight Recorder: a dump after it; the hook: `hook_grace_s` after
it, for the watchdog to notice the last ones); a final step's stats ride the next report sent, with their
own step number; at exit, `final` sends what is left (the transport resends its last report with it).
Everything is bounded and fail-open: errors and drops are counted in `counters`.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Collectives listed one by one per group and step; past this only counted (and summed).
MAX_LISTED = 256
# Completion-hook events waiting for the sender, and events waiting for their step to end, at most.
MAX_EVENTS = 8192
# Step windows remembered to place late events in (a step older than these is final anyway).
MAX_WINDOWS = 64
# The Flight Recorder dump may take at most this share of the time between dumps.
FR_BUDGET = 0.01

_DTYPE_BYTES = {
    "Float": 4,
    "Double": 8,
    "Half": 2,
    "BFloat16": 2,
    "Long": 8,
    "Int": 4,
    "Short": 2,
    "Char": 1,
    "Byte": 1,
    "Bool": 1,
    "ComplexFloat": 8,
    "ComplexDouble": 16,
    "Float8_e4m3fn": 1,
    "Float8_e5m2": 1,
}
_P2P_OPS = ("SEND", "RECV", "RECVANYSOURCE")


@dataclass
class GroupStats:
    """One process group's collectives of one step (the wire's CollectiveStats)."""

    step: int
    group: str
    backend: str
    group_size: int
    ranks_hash: int
    count: int = 0
    total_ns: int = 0
    wait_ns: int = 0
    bytes: int = 0
    active_measured: bool = False
    seq: list[int] = field(default_factory=list)
    issue_ns: list[int] = field(default_factory=list)
    active_ns: list[int] = field(default_factory=list)
    unlisted: int = 0


@dataclass
class _Group:
    name: str
    backend: str
    size: int
    ranks_hash: int
    hooked: bool = False  # completion-hook events (NCCL); else the Flight Recorder's


def ranks_hash(ranks) -> int:
    """The same 63-bit number on every member of a group (its sorted global ranks)."""
    text = ",".join(str(r) for r in sorted(int(r) for r in ranks))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _to_ns(value) -> int:
    """A WorkInfo time (datetime: system clock) or duration (timedelta) in ns; plain numbers are ns."""
    if hasattr(value, "total_seconds"):  # exact: whole microseconds, no float seconds
        return ((value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds) * 1000
    if hasattr(value, "timestamp"):
        return round(value.replace(microsecond=0).timestamp()) * 10**9 + value.microsecond * 1000
    return int(value)


def _entry_bytes(entry: dict) -> int:
    total = 0
    for shape, dtype in zip(entry.get("input_sizes") or (), entry.get("input_dtypes") or ()):
        total += math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
    return total


def _dump_flight_recorder() -> list[dict]:
    import torch

    c10d: Any = torch._C._distributed_c10d
    raw = c10d._dump_fr_trace(includeCollectives=True, includeStackTraces=False, onlyActive=False)
    return pickle.loads(raw).get("entries", [])


class Collectives:
    """Per-step collective stats for the sender thread: attach(records) before they are encoded.

    `c10d` is torch.distributed.distributed_c10d (looked up when first needed: the user's script creates
    the groups after the agent starts); `dump` returns Flight Recorder entries; both are seams for tests.
    """

    def __init__(
        self,
        c10d=None,
        dump: Callable[[], list[dict]] = _dump_flight_recorder,
        clock: Callable[[], int] = time.perf_counter_ns,
        wall: Callable[[], int] = time.time_ns,
        flight_recorder: bool = True,
        fr_interval_s: float = 1.0,
        hook_grace_s: float = 1.0,
    ) -> None:
        self._c10d = c10d
        self._dump = dump
        self._clock = clock
        self._wall = wall
        self._fr_interval_ns = int(fr_interval_s * 1e9)
        self._grace_ns = int(hook_grace_s * 1e9)
        self._groups: dict[str, _Group] = {}
        self._known_pgs: set[int] = set()
        self._hook_events: collections.deque = collections.deque()  # written by torch's hook thread
        self._events: list[tuple] = []  # (issue_ns, group, seq, active_ns, wait_ns, bytes), not placed yet
        self._windows: collections.deque = collections.deque(maxlen=MAX_WINDOWS)  # (step, start, end)
        self._stats: dict[int, dict[str, GroupStats]] = {}  # step -> group -> stats, not final yet
        self._last_record_id = -1
        self._next_dump_ns = 0
        self._dumped_at = -1  # agent clock of the last dump: the Flight Recorder is seen up to here
        self._flight_recorder = flight_recorder
        self._uses_fr = False  # some group's collectives come from the Flight Recorder
        self.counters = {"collectives": 0, "collectives_dropped": 0, "collective_errors": 0, "fr_dumps": 0}

    # ---- torch's hook thread ----------------------------------------------------------------
    def _hook(self, group: str, info) -> None:
        try:
            if len(self._hook_events) >= MAX_EVENTS:
                self.counters["collectives_dropped"] += 1
                return
            self._hook_events.append(
                (group, info.op_type, info.seq, info.time_started, info.time_finished, info.active_duration)
            )
        except Exception:
            self.counters["collective_errors"] += 1

    # ---- sender thread ----------------------------------------------------------------------
    def attach(self, records: list) -> None:
        """Place what was gathered since the last call in steps, and hand every final step's stats to the
        last of `records` (its `collectives`). Never raises."""
        try:
            for record in records:
                self._windows.append((record.step, record.start_ns, record.end_ns))
            self._discover()
            now = self._clock()
            self._read_hook_events(now)
            self._read_flight_recorder(now)
            self._place()
            ready = self._final(now)
            if ready and records:
                records[-1].collectives.extend(ready)
        except Exception:
            self.counters["collective_errors"] += 1
            logger.debug("modtrack: collective stats failed", exc_info=True)

    def final(self) -> list[GroupStats]:
        """At exit, on the thread that closes the transport: what is still gathered, read now (one last Flight
        Recorder dump whatever the rate limit, no grace for the hook), for the stats of the last steps to go out
        with a copy of the last report. Without it a rank's last second of stats never comes, and the collector
        could not take its peers' waits out of their module compute in those steps. Never raises."""
        try:
            self._discover()
            now = self._clock()
            self._next_dump_ns = 0
            self._grace_ns = 0
            self._read_hook_events(now)
            self._read_flight_recorder(now)
            self._place()
            return self._final(now)
        except Exception:
            self.counters["collective_errors"] += 1
            logger.debug("modtrack: final collective stats failed", exc_info=True)
            return []

    def _discover(self) -> None:
        """Learn process groups created since the last call; hook NCCL ones."""
        c10d = self._c10d if self._c10d is not None else sys.modules.get("torch.distributed.distributed_c10d")
        if c10d is None or not c10d.is_initialized():
            return
        self._c10d = c10d
        world = c10d._world
        for pg, name in list(world.pg_names.items()):
            if id(pg) in self._known_pgs:
                continue
            self._known_pgs.add(id(pg))
            try:
                backend = str(c10d.get_backend(pg))
                ranks = list(world.pg_group_ranks.get(pg, {}).keys())
                group = _Group(name, backend, len(ranks) or pg.size(), ranks_hash(ranks))
                group.hooked = backend == "nccl" and self._register_hook(pg, name)
                self._uses_fr = self._uses_fr or (self._flight_recorder and not group.hooked)
                self._groups[name] = group
            except Exception:
                self.counters["collective_errors"] += 1
                logger.debug("modtrack: could not learn process group %r", name, exc_info=True)

    def _register_hook(self, pg, name: str) -> bool:
        try:
            pg._enable_collectives_timing()
            pg._register_on_completion_hook(lambda info, name=name: self._hook(name, info))
            return True
        except Exception:  # taken by the user, or a torch without it: the Flight Recorder instead
            self.counters["collective_errors"] += 1
            logger.debug("modtrack: no completion hook on group %r", name, exc_info=True)
            return False

    def _to_agent_clock(self) -> int:
        """Offset from system-clock ns (torch's stamps) to the agent's clock: the tightest of three pairs."""
        best_gap, best = None, 0
        for _ in range(3):
            before = self._clock()
            wall = self._wall()
            after = self._clock()
            if best_gap is None or after - before < best_gap:
                best_gap, best = after - before, (before + after) // 2 - wall
        return best

    def _read_hook_events(self, now: int) -> None:
        events = self._hook_events
        if not events:
            return
        offset = self._to_agent_clock()
        for _ in range(len(events)):
            group, op, seq, started, finished, active = events.popleft()
            if getattr(op, "name", str(op)).rsplit(".", 1)[-1] in _P2P_OPS:
                continue
            issue = _to_ns(started) + offset
            active_ns = max(0, _to_ns(active))
            wait_ns = max(0, _to_ns(finished) - _to_ns(started) - active_ns)
            self._events.append((issue, group, int(seq), active_ns, wait_ns, 0))

    def _read_flight_recorder(self, now: int) -> None:
        if not self._uses_fr or now < self._next_dump_ns:
            return
        begun = time.perf_counter_ns()
        entries = self._dump()
        cost = time.perf_counter_ns() - begun
        self.counters["fr_dumps"] += 1
        self._next_dump_ns = now + max(self._fr_interval_ns, int(cost / FR_BUDGET))
        self._dumped_at = now
        offset = self._to_agent_clock()
        groups = self._groups
        last = self._last_record_id
        new = [e for e in entries if e.get("record_id", -1) > last]
        if not new:
            return
        first = min(e["record_id"] for e in new)
        if last >= 0 and first > last + 1:
            self.counters["collectives_dropped"] += first - last - 1  # the ring wrapped between two dumps
        self._last_record_id = max(e["record_id"] for e in new)
        for e in new:
            name = (e.get("process_group") or ("",))[0]
            group = groups.get(name)
            if group is None or group.hooked or e.get("is_p2p") or "time_created_ns" not in e:
                continue
            issue = int(e["time_created_ns"]) + offset
            self._events.append((issue, name, int(e["collective_seq_id"]), -1, 0, _entry_bytes(e)))

    def _place(self) -> None:
        """Each event into the stats of the step whose window holds its issue time."""
        if not self._events:
            return
        windows = list(self._windows)
        keep = []
        for event in self._events:
            issue = event[0]
            step = next((s for s, start, end in reversed(windows) if start <= issue < end), None)
            if step is None:
                if windows and issue >= windows[-1][2]:
                    keep.append(event)  # its step has not ended yet
                else:
                    self.counters["collectives_dropped"] += 1  # before tracking, or older than every window
                continue
            self._add(step, event)
        if len(keep) > MAX_EVENTS:
            self.counters["collectives_dropped"] += len(keep) - MAX_EVENTS
            keep = keep[-MAX_EVENTS:]
        self._events = keep

    def _add(self, step: int, event: tuple) -> None:
        issue, name, seq, active, wait, nbytes = event
        group = self._groups[name]
        per_step = self._stats.setdefault(step, {})
        stats = per_step.get(name)
        if stats is None:
            stats = per_step[name] = GroupStats(step, name, group.backend, group.size, group.ranks_hash)
            stats.active_measured = active >= 0
        stats.count += 1
        stats.bytes += nbytes
        stats.wait_ns += wait
        self.counters["collectives"] += 1
        if active >= 0:
            stats.total_ns += active
        if len(stats.seq) >= MAX_LISTED:
            stats.unlisted += 1
            return
        stats.seq.append(seq)
        stats.issue_ns.append(issue)
        if stats.active_measured:
            stats.active_ns.append(max(active, 0))

    def _final(self, now: int) -> list[GroupStats]:
        """Stats of every step every source has seen past the end of, oldest first (listed by issue time)."""
        seen = now - self._grace_ns if any(g.hooked for g in self._groups.values()) else now
        if self._uses_fr:
            seen = min(seen, self._dumped_at)
        ends = {step: end for step, _, end in self._windows}
        ready = []
        for step in sorted(self._stats):
            end = ends.get(step)
            if end is not None and end > seen:
                break
            for stats in self._stats.pop(step).values():
                order = sorted(range(len(stats.seq)), key=stats.issue_ns.__getitem__)
                stats.seq = [stats.seq[i] for i in order]
                stats.issue_ns = [stats.issue_ns[i] for i in order]
                if stats.active_ns:
                    stats.active_ns = [stats.active_ns[i] for i in order]
                ready.append(stats)
        return ready
