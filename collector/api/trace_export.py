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

import json
from dataclasses import dataclass, field

import numpy as np

from modtrack.collector.records import PHASE_NAMES

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


def build_trace(job: str, ranks: list[RankTimeline], source: str, from_step: int, to_step: int) -> dict:
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
            # the steps that have module calls in this document (captured ones, for a capture)
            "captured_steps": sorted({int(s) for tl in ranks for s in np.unique(tl.step).tolist()})
            if source == "capture"
            else [],
        },
    }


def _origin_ns(ranks: list[RankTimeline]) -> int:
    firsts = [int(np.min(a)) + tl.offset_ns for tl in ranks for a in (tl.start_ns, tl.step_start_ns) if len(a)]
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
        numbers = np.asarray(tl.step_number, np.int64)
        events += _track_events(
            pid,
            STEP_TID,
            "steps",
            "step",
            [f"step {n}" for n in numbers.tolist()],
            np.asarray(tl.step_start_ns, np.int64) + shift,
            np.asarray(tl.step_end_ns, np.int64) + shift,
            np.zeros(len(numbers), np.int64),
            numbers,
        )
    phase = np.asarray(tl.phase, np.int64)
    names = tl.module_names
    for ph in sorted(set(phase.tolist())):
        sel = np.flatnonzero(phase == ph)
        label = PHASE_NAMES.get(ph, f"phase {ph}")
        depth = np.asarray(tl.depth, np.int64)[sel] if tl.depth is not None else np.zeros(len(sel), np.int64)
        modules = [
            names[m] if 0 <= m < len(names) else f"module {m}" for m in np.asarray(tl.module_id, np.int64)[sel].tolist()
        ]
        events += _track_events(
            pid,
            PHASE_TID.get(ph, 10 + ph),
            label,
            label,
            modules,
            np.asarray(tl.start_ns, np.int64)[sel] + shift,
            np.asarray(tl.end_ns, np.int64)[sel] + shift,
            depth,
            np.asarray(tl.step, np.int64)[sel],
        )
    return events


def _track_events(
    pid: int,
    tid: int,
    label: str,
    cat: str,
    names: list[str],
    starts: np.ndarray,
    ends: np.ndarray,
    depth: np.ndarray,
    steps: np.ndarray,
) -> list[dict]:
    """One track's complete events (nanoseconds from the origin), with overflow tracks for
    what does not nest."""
    ends = np.maximum(ends, starts)
    # Parents before children: by start, then longest first, then shallowest first.
    order = np.lexsort((depth, -(ends - starts), starts))
    starts, ends = starts[order], ends[order]
    lanes = _nesting_lanes(starts, ends)
    tids = [tid] + [OVERFLOW_TID_BASE + 10 * tid + lane for lane in range(1, int(lanes.max(initial=0)) + 1)]
    events = []
    for lane, lane_tid in enumerate(tids):
        events.append(_meta(pid, lane_tid, "thread_name", label if lane == 0 else f"{label} #{lane + 1}"))
        events.append(_meta(pid, lane_tid, "thread_sort_index", lane_tid, key="sort_index"))
    for i, lane, ts, dur, step in zip(
        order.tolist(), lanes.tolist(), _us(starts), _us(ends - starts), steps[order].tolist()
    ):
        events.append(
            {
                "name": names[i],
                "cat": cat,
                "ph": "X",
                "pid": pid,
                "tid": tids[lane],
                "ts": ts,
                "dur": dur,
                "args": {"step": step},
            }
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


# --- from the store to timelines, and the HTTP route -------------------------------------

MAX_STEPS = 200  # one request's step range: a trace covers a few steps, not a run


def timelines_from_store(store, job: str, from_step: int, to_step: int) -> tuple[list[RankTimeline], str]:
    """Each known rank's timeline over [from_step, to_step], and the source used.

    Captured calls when the range holds any; otherwise every module's first-start..last-end
    span per step and phase from the per-step summary. Step spans come from the summary either way.
    """
    names = store.module_names(job)
    clocks = store.rank_clocks(job)
    captured = store.trace_calls(job, from_step, to_step)
    source = "capture" if captured else "step_summary"
    spans = _step_spans(store, job, from_step, to_step)
    columns: dict[int, list[tuple]] = {}
    if captured:
        for rank, chunks in captured.items():
            for c in chunks:
                n = len(c["start"])
                columns.setdefault(rank, []).append(
                    (np.full(n, c["step"], np.int64), c["module"], c["phase"], c["start"], c["end"], c["depth"])
                )
    else:
        for step in range(from_step, to_step + 1):
            for rank, m in store.step_modules(job, step).items():
                keep = (m["calls"] > 0) & (m["last_end"] >= m["first_start"])
                n = int(keep.sum())
                columns.setdefault(rank, []).append(
                    (
                        np.full(n, step, np.int64),
                        m["module"][keep],
                        m["phase"][keep],
                        m["first_start"][keep],
                        m["last_end"][keep],
                        np.zeros(n, np.int64),
                    )
                )
    timelines = []
    for rank in sorted(set(clocks) | set(columns) | set(spans)):
        parts = columns.get(rank, [])
        cat = [
            np.concatenate([np.asarray(p[i], np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
            for i in range(6)
        ]
        steps = spans.get(rank, ([], [], []))
        clock = clocks.get(rank, {})
        timelines.append(
            RankTimeline(
                rank=int(rank),
                host=clock.get("host") or "?",
                offset_ns=int(clock.get("clock_offset_ns") or 0),
                module_names=names,
                step=cat[0],
                module_id=cat[1],
                phase=cat[2],
                start_ns=cat[3],
                end_ns=cat[4],
                depth=cat[5],
                step_number=np.asarray(steps[0], np.int64),
                step_start_ns=np.asarray(steps[1], np.int64),
                step_end_ns=np.asarray(steps[2], np.int64),
            )
        )
    return timelines, source


def _step_spans(store, job: str, from_step: int, to_step: int) -> dict[int, tuple[list, list, list]]:
    """rank -> (steps, start_ns, end_ns) for the stored steps in the range."""
    last = max((j["last_step"] or 0) for j in store.jobs() if j["job"] == job) if store.job_exists(job) else 0
    out: dict[int, tuple[list, list, list]] = {}
    if last < from_step:
        return out
    for step, rank, start_ns, end_ns, *_ in store.last_steps(job, last - from_step + 1):
        if from_step <= step <= to_step and start_ns is not None and end_ns is not None:
            steps, starts, ends = out.setdefault(rank, ([], [], []))
            steps.append(step)
            starts.append(start_ns)
            ends.append(end_ns)
    return out


def make_trace_handler(store, read=None):
    """GET /api/v1/jobs/{job}/trace?from_step=A&to_step=B (defaults: the last 5 stored steps).

    `read(fn, *args)` runs a store read off the event loop (the collector's read pool);
    asyncio.to_thread without one.
    """
    import asyncio

    from aiohttp import web

    read = read or asyncio.to_thread

    def error(status: int, message: str):
        return web.json_response({"error": message}, status=status)

    async def handle(request):
        job = request.match_info["job"]
        if not await read(store.job_exists, job):
            return error(404, f"unknown job {job!r}")
        try:
            jobs = await read(store.jobs)
            last = next(j["last_step"] for j in jobs if j["job"] == job)
            to_step = int(request.query.get("to_step", last if last is not None else 0))
            from_step = int(request.query.get("from_step", max(0, to_step - 4)))
        except ValueError:
            return error(400, "from_step and to_step must be integers")
        if from_step < 0 or to_step < from_step:
            return error(400, "want 0 <= from_step <= to_step")
        if to_step - from_step + 1 > MAX_STEPS:
            return error(400, f"at most {MAX_STEPS} steps per trace")
        timelines, source = await read(timelines_from_store, store, job, from_step, to_step)
        # built and serialized off the event loop: a large capture takes a fraction of a second
        body = await read(lambda: json.dumps(build_trace(job, timelines, source, from_step, to_step)))
        name = f"modtrack-{job}-steps-{from_step}-{to_step}.json"
        return web.Response(
            text=body,
            content_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    return handle
