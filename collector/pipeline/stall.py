"""The stall verdict: from the latest heartbeat of every rank, is the job hung, and who holds it?

Pure (numpy, no torch, no I/O): collector/stall_watch.py feeds it. A rank sends heartbeats only while
its step runs long (agent/heartbeat.py), so:
- a rank without a current heartbeat is running (it ends steps), and then the job is not stalled;
- a rank whose position changed lately (seconds at its position well under its step time) is moving:
  a slow step, an evaluation loop, not a hang;
- when every rank that is not missing is long and still, the job is stalled. The rank that holds
  it is the one not waiting in a collective while others are; failing that, the one behind (an
  earlier step, or an earlier stage of the same step). Every rank still in one and the same place,
  none in a collective, is the whole job paused there (a checkpoint, an evaluation), not a stall:
  "paused" says where, and every rank's state stays "running" (CONTRACT.md's states: nobody is stuck,
  nobody waits for anyone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PHASES = ("forward", "backward", "recompute", "optimizer", "data", "outside")
WAITING_FRAMES = 3  # innermost frames kept for a waiting rank: where it waits
MOVING_FRACTION = 0.5  # at its position for less than this share of its long step: it moves
# Where a collective blocks the training thread: torch.distributed's Python API, DDP's module, and
# the autograd engine once every module's backward is done (DDP's reducer waits for the gradient
# all-reduce in the engine's final callback, in C++ under `backward()`).
# Paths as the agent sends them: installed files from their package on ("torch/...").
COLLECTIVE_PATHS = ("torch/distributed/", "torch/nn/parallel/distributed.py")
ENGINE_PATHS = ("torch/autograd/", "torch/_tensor.py")


@dataclass
class Beat:
    """A rank's latest heartbeat, aged to now."""

    step: int
    phase: str
    module: str | None
    seconds: float  # at this phase and module
    step_seconds: float  # the step in progress so far
    stack: list[str] = field(default_factory=list)  # innermost last
    backward_passes: int = 0


@dataclass
class RankView:
    rank: int
    host: str
    missing: bool = False
    beat: Beat | None = None  # None: no current heartbeat (the rank ends steps)


def waits_in_collective(beat: Beat) -> bool:
    """True when the innermost Python frame is inside a collective (or DDP's gradient wait)."""
    if not beat.stack:
        return False
    innermost = beat.stack[-1].replace("\\", "/")
    if any(p in innermost for p in COLLECTIVE_PATHS):
        return True
    return beat.phase == "backward" and beat.module is None and any(p in innermost for p in ENGINE_PATHS)


def stage(beat: Beat) -> int:
    """Order of the phases within a step: data, forward, outside (before backward), backward in a
    module, backward after every module (the gradient sync), outside (after backward), optimizer."""
    if beat.phase == "data":
        return 0
    if beat.phase == "forward":
        return 1
    if beat.phase == "outside":
        return 2 if beat.backward_passes == 0 else 5
    if beat.phase in ("backward", "recompute"):
        return 4 if beat.module is None and beat.phase == "backward" else 3
    return 6  # optimizer


def verdict(job: str, ranks: list[RankView]) -> dict:
    """The answer of GET /api/v1/jobs/{job}/stall (CONTRACT.md), plus "paused" and "summary"."""
    ranks = sorted(ranks, key=lambda r: r.rank)
    present = [r for r in ranks if not r.missing]
    long = [r for r in present if r.beat is not None]
    beats: list[Beat] = [r.beat for r in long if r.beat is not None]
    state = {r.rank: ("missing" if r.missing else "running") for r in ranks}
    answer: dict = {"job": job, "stalled": False, "since_s": None, "step": None, "paused": None, "summary": ""}
    if not long or len(long) < len(present):
        answer["summary"] = _running_summary(ranks, long)
        return _with_ranks(answer, ranks, state, set())
    seconds = np.array([b.seconds for b in beats])
    step_seconds = np.array([b.step_seconds for b in beats])
    if (seconds < MOVING_FRACTION * step_seconds).any():
        answer["summary"] = "a long step, but the ranks move"
        return _with_ranks(answer, ranks, state, set())
    waiting = np.array([waits_in_collective(b) for b in beats])
    keys = np.array([b.step * 8 + stage(b) for b in beats], dtype=np.int64)
    places = {(b.step, b.phase, b.module) for b in beats}
    if not waiting.any() and len(places) == 1:
        b = beats[0]
        answer.update(
            since_s=round(float(seconds.min()), 3),
            step=b.step,
            paused={
                "step": b.step,
                "phase": b.phase,
                "module": b.module,
                "seconds": round(float(seconds.min()), 3),
                "stack": b.stack,
            },
            summary=f"the whole job is paused at {_where(b)} (every rank in the same place)",
        )
        return _with_ranks(answer, ranks, state, set())
    if waiting.all() and len(places) == 1:
        stuck = np.zeros(len(long), dtype=bool)  # all wait in one collective: the collective hangs
    elif waiting.any() and not waiting.all():
        stuck = ~waiting
    else:
        stuck = keys == keys.min()
    for r, is_stuck in zip(long, stuck.tolist()):
        state[r.rank] = "stuck" if is_stuck else "waiting"
    held = seconds[stuck] if stuck.any() else seconds
    first = beats[int(np.flatnonzero(stuck)[0])] if stuck.any() else beats[0]
    answer.update(
        stalled=True,
        since_s=round(float(held.max() if stuck.any() else held.min()), 3),
        step=int(first.step),
        summary=_stall_summary(long, stuck, first),
    )
    return _with_ranks(answer, ranks, state, {r.rank for r, s in zip(long, stuck.tolist()) if s})


def _with_ranks(answer: dict, ranks: list[RankView], state: dict, full_stack: set) -> dict:
    out = []
    for r in ranks:
        b = r.beat
        entry = {
            "rank": r.rank,
            "host": r.host,
            "state": state[r.rank],
            "phase": None,
            "module": None,
            "seconds": None,
            "stack": [],
            "step": None,
        }
        if b is not None:
            entry.update(
                phase=b.phase,
                module=b.module,
                seconds=round(b.seconds, 3),
                step=b.step,
                stack=b.stack if r.rank in full_stack else b.stack[-WAITING_FRAMES:],
            )
        out.append(entry)
    answer["ranks"] = out
    return answer


def _where(b: Beat) -> str:
    return f"{b.module} ({b.phase}), step {b.step}" if b.module else f"{b.phase}, step {b.step}"


def _stall_summary(long: list[RankView], stuck: np.ndarray, first: Beat) -> str:
    waiting = [r.rank for r, s in zip(long, stuck.tolist()) if not s]
    if not stuck.any():
        return f"every rank waits in the same place, {_where(first)}, for {first.seconds:.0f} s"
    stuck_ranks = [r.rank for r, s in zip(long, stuck.tolist()) if s]
    who = f"rank {stuck_ranks[0]}" if len(stuck_ranks) == 1 else "ranks " + ", ".join(map(str, stuck_ranks))
    text = f"{who} stuck in {_where(first)} for {first.seconds:.0f} s"
    if waiting:
        text += (
            f"; ranks {', '.join(map(str, waiting))} wait for it"
            if len(waiting) > 1
            else f"; rank {waiting[0]} waits for it"
        )
    return text


def _running_summary(ranks: list[RankView], long: list[RankView]) -> str:
    missing = [r.rank for r in ranks if r.missing]
    text = "running" if not long else f"running; {len(long)} rank(s) in a long step"
    return text + (f"; missing: {', '.join(map(str, missing))}" if missing else "")
