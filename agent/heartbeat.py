"""The heartbeat: where a rank is, and its training thread's Python stack, while its step runs long.

A hung rank reports nothing (its step never ends), and the ranks waiting for it report nothing
either. So the sender thread, which never needs the training thread, looks at the tracker's
position (agent/position.py) each time it wakes: once the step in progress has run longer than
`factor` x the rank's median step and at least `min_s`, it sends a Heartbeat with the position and
the innermost frames of the training thread (`sys._current_frames()`), again every `repeat_s` while
the step lasts, and one `running` heartbeat when the rank moves on. The training thread may be
blocked in C code (a collective, a sleep, a device wait) meanwhile: nothing here waits for it.

Steps are learnt from the position alone (its step number and start), so the heartbeat needs no
hook of its own. No heartbeat before the first step ended: without a median, a long start-up is
not a hang.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from modtrack.agent import config
from modtrack.agent.position import NO_MODULE, PHASE_NAMES, Position
from modtrack.protos import modtrack_pb2 as pb

MAX_FRAME_CHARS = 300  # per line of the stack: a heartbeat stays a few kB


@dataclass(frozen=True)
class HeartbeatSettings:
    factor: float = 3.0  # a step is long past factor x the rank's median step...
    min_s: float = 5.0  # ...and at least this long
    repeat_s: float = 3.0  # while it lasts, a heartbeat this often
    max_frames: int = 24  # innermost frames of the stack sent

    @classmethod
    def from_env(cls, env=os.environ) -> HeartbeatSettings:
        """MODTRACK_STALL_FACTOR, _MIN_S, _REPEAT_S (agent/config.py); a value that is no positive number
        keeps the default."""
        default, read = cls(), config.from_env(env)

        def number(value: str, fallback: float) -> float:
            try:
                parsed = float(value)
            except ValueError:
                return fallback
            return parsed if parsed > 0 else fallback

        return cls(
            factor=number(read.stall_factor, default.factor),
            min_s=number(read.stall_min_s, default.min_s),
            repeat_s=number(read.stall_repeat_s, default.repeat_s),
        )


# nn.Module.__call__'s own frames, three per module call: they say nothing the module names do not.
MODULE_CALL = ("torch/nn/modules/module.py", ("_wrapped_call_impl", "_call_impl", "inner"))


def thread_stack(thread_id: int, max_frames: int) -> list[str]:
    """The innermost `max_frames` frames of a thread, "file:line in function: code", innermost last;
    without nn.Module's call plumbing, installed files shown from their package on."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return []
    try:
        frames = traceback.extract_stack(frame, limit=4 * max_frames)
    finally:
        del frame
    lines = []
    for f in frames:
        path = f.filename.replace("\\", "/")
        if path.endswith(MODULE_CALL[0]) and f.name in MODULE_CALL[1]:
            continue
        installed = path.rfind("-packages/")
        path = path[installed + len("-packages/") :] if installed >= 0 else path
        lines.append(f"{path}:{f.lineno} in {f.name}{': ' + f.line if f.line else ''}"[:MAX_FRAME_CHARS])
    return lines[-max_frames:]


class Heartbeat:
    """poll() from the sender thread, as often as it wakes (at least every second): a pb.Heartbeat
    to send, or None. Never raises (errors are counted)."""

    def __init__(
        self,
        position: Position,
        names: Callable[[], list],
        settings: HeartbeatSettings | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
    ):
        self.position = position
        self.settings = settings or HeartbeatSettings()
        self.errors = 0
        self.sent = 0
        self._names = names
        self._clock = clock
        self._steps: collections.deque[float] = collections.deque(maxlen=64)  # recent step times, ns
        self._median_ns = 0.0
        self._seen: tuple | None = None  # the position's snapshot at the last look
        self._since_ns = 0  # when the position was first seen as it is now
        self._seen_step = -1
        self._seen_step_start = 0
        self._long = False  # a heartbeat went out for the step in progress
        self._next_ns = 0

    def poll(self) -> pb.Heartbeat | None:
        try:
            return self._poll(self._clock())
        except Exception:
            self.errors += 1
            return None

    def _poll(self, now: int) -> pb.Heartbeat | None:
        position = self.position
        seen = position.snapshot()
        step_start = position.step_start_ns
        moved = None
        if seen != self._seen:
            self._seen = seen
            self._since_ns = now
            step = seen[0]
            if step != self._seen_step:
                if 0 <= self._seen_step < step and step_start > self._seen_step_start:
                    self._steps.append((step_start - self._seen_step_start) / (step - self._seen_step))
                    self._median_ns = statistics.median(self._steps)
                self._seen_step, self._seen_step_start = step, step_start
                if self._long:
                    self._long = False
                    moved = pb.Heartbeat(step=step, running=True)
        if moved is not None or not self._median_ns:
            return moved
        s = self.settings
        step_ns = now - step_start
        if step_ns < max(s.factor * self._median_ns, s.min_s * 1e9) or now < self._next_ns:
            return None
        self._long = True
        self._next_ns = now + int(s.repeat_s * 1e9)
        self.sent += 1
        step, phase, module, passes, _ = seen
        names = self._names()
        return pb.Heartbeat(
            step=step,
            phase=PHASE_NAMES[phase],
            module=names[module] if module != NO_MODULE and 0 <= module < len(names) else "",
            step_ns=step_ns,
            position_ns=now - self._since_ns,
            median_step_ns=int(self._median_ns),
            stack=thread_stack(position.thread_id, s.max_frames),
            backward_passes=passes,
            repeat_ms=int(s.repeat_s * 1000),
        )
