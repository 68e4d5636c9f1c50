"""Every rank's timeline as one Chrome trace / Perfetto JSON document.

One process per rank ("rank R @ host"), one track (thread) per phase, module calls as complete
("X") events. Each rank's timestamps are moved from its own clock to the collector's
(collector_ns = agent_ns + offset_ns), so ranks on different hosts line up.

Two sources: a captured trace (every module call of the captured steps), or, without one, the
per-step summary each rank always sends (first start .. last end of each module in each phase:
one coarser span per module and step), so a stored step range never gives an empty timeline.
`otherData.source` says which ("capture" or "step_summary").

The JSON format wants events on one track to nest perfectly. Captured calls do; summary spans
of a module called several times may straddle a sibling's. Rather than clip what was measured,
an event that does not nest goes to an overflow track of the same phase ("forward #2").

Timestamps are microseconds on the collector clock counted from `otherData.ts_origin_ns`
(the earliest event, floored to a millisecond): absolute nanosecond clocks do not fit a double
at sub-microsecond precision, and rounding would break the nesting the importer demands.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PHASE_NAMES = {1: "forward", 2: "backward", 3: "recompute"}
# Track ids within a rank's process: steps first, then one per phase; overflow tracks after.
STEP_TID = 1
PHASE_TID = {1: 2, 2: 3, 3: 4}
OVERFLOW_TID_BASE = 100


@dataclass
class RankTimeline:
    """What the store holds for one rank over a step range, on the rank's own clock.

    Calls are columns: entry i of every array is one call (captured) or one module's span
    in one step (summary). `phase` uses the wire's numbers: 1 forward, 2 backward, 3 recompute.
    """

    rank: int
    host: str
    offset_ns: int  # collector_ns = agent_ns + offset_ns
    module_names: list[str]  # module id -> name
    step: np.ndarray  # int64, the step of each call
    module_id: np.ndarray  # int64
    phase: np.ndarray  # int64
    start_ns: np.ndarray  # int64, agent clock
    end_ns: np.ndarray  # int64, agent clock
    depth: np.ndarray | None = None  # nesting depth within the phase, if known
    # Step spans (optional): the step number and its start/end on the agent clock.
    step_number: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    step_start_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    step_end_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def build_trace(
    job: str, ranks: list[RankTimeline], source: str, from_step: int, to_step: int
) -> dict:
    """The Chrome trace JSON object for `ranks` (a dict ready for json.dumps)."""
    origin = _origin_ns(ranks)
    events: list[dict] = []
    for tl in sorted(ranks, key=lambda r: r.rank):
        events.extend(_rank_events(tl, origin))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "job": job,
            "source": source,
            "from_step": from_step,
            "to_step": to_step,
            "clock": "collector",
            "ts_origin_ns": origin,
            "ranks": [tl.rank for tl in sorted(ranks, key=lambda r: r.rank)],
        },
    }


def _origin_ns(ranks: list[RankTimeline]) -> int:
    firsts = [
        int(np.min(a)) + tl.offset_ns
        for tl in ranks
        for a in (tl.start_ns, tl.step_start_ns)
        if len(a)
    ]
    if not firsts:
        return 0
    return (min(firsts) // 1_000_000) * 1_000_000


def _us(ns: np.ndarray) -> list[float]:
    """Nanoseconds (relative to the origin) as microseconds, exact to the nanosecond."""
    return (np.asarray(ns, dtype=np.int64) / 1000.0).tolist()


def _rank_events(tl: RankTimeline, origin: int) -> list[dict]:
    pid = int(tl.rank)
    shift = int(tl.offset_ns) - origin
    events: list[dict] = [
        _meta(pid, 0, "process_name", f"rank {pid} @ {tl.host}"),
        _meta(pid, 0, "process_sort_index", pid, key="sort_index"),
    ]
    if len(tl.step_number):
        events.append(_meta(pid, STEP_TID, "thread_name", "steps"))
        starts = np.asarray(tl.step_start_ns, np.int64) + shift
        ends = np.maximum(np.asarray(tl.step_end_ns, np.int64) + shift, starts)
        for n, ts, dur in zip(
            np.asarray(tl.step_number).tolist(), _us(starts), _us(ends - starts)
        ):
            events.append(
                {"name": f"step {n}", "cat": "step", "ph": "X", "pid": pid,
                 "tid": STEP_TID, "ts": ts, "dur": dur, "args": {"step": n}}
            )

    phase = np.asarray(tl.phase, np.int64)
    for ph in sorted(set(phase.tolist())):
        sel = np.flatnonzero(phase == ph)
        if not len(sel):
            continue
        name = PHASE_NAMES.get(ph, f"phase {ph}")
        starts = np.asarray(tl.start_ns, np.int64)[sel] + shift
        ends = np.maximum(np.asarray(tl.end_ns, np.int64)[sel] + shift, starts)
        depth = (
            np.asarray(tl.depth, np.int64)[sel] if tl.depth is not None else np.zeros(len(sel), np.int64)
        )
        # Parents before children: by start, then longest first, then shallowest first.
        order = np.lexsort((depth, -(ends - starts), starts))
        starts, ends = starts[order], ends[order]
        modules = np.asarray(tl.module_id, np.int64)[sel][order].tolist()
        steps = np.asarray(tl.step, np.int64)[sel][order].tolist()
        lanes = _nesting_lanes(starts, ends)
        base_tid = PHASE_TID.get(ph, 10 + ph)
        for lane in range(int(lanes.max()) + 1 if len(lanes) else 1):
            tid = base_tid if lane == 0 else OVERFLOW_TID_BASE + 10 * ph + lane
            label = name if lane == 0 else f"{name} #{lane + 1}"
            events.append(_meta(pid, tid, "thread_name", label))
            events.append(_meta(pid, tid, "thread_sort_index", tid, key="sort_index"))
        names = tl.module_names
        for mid, step, lane, ts, dur in zip(
            modules, steps, lanes.tolist(), _us(starts), _us(ends - starts)
        ):
            tid = base_tid if lane == 0 else OVERFLOW_TID_BASE + 10 * ph + lane
            module = names[mid] if 0 <= mid < len(names) else f"module {mid}"
            events.append(
                {"name": module, "cat": name, "ph": "X", "pid": pid, "tid": tid,
                 "ts": ts, "dur": dur, "args": {"step": step}}
            )
    return events


def _meta(pid: int, tid: int, name: str, value, key: str = "name") -> dict:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": {key: value}}


def _nesting_lanes(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For events sorted parents-first, the first lane where each one nests perfectly.

    A lane keeps a stack of open events; an event fits a lane when, after closing what ended
    before it starts, it lies inside the innermost open one (or the lane is empty).
    Sequential by nature, but linear: one pass, a few lanes at most.
    """
    lanes = np.zeros(len(starts), np.int64)
    stacks: list[list[int]] = []
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        for lane, stack in enumerate(stacks):
            while stack and stack[-1] <= s:
                stack.pop()
            if not stack or e <= stack[-1]:
                stack.append(e)
                lanes[i] = lane
                break
        else:
            stacks.append([e])
            lanes[i] = len(stacks) - 1
    return lanes
