"""What one agent may send: the bounds checked at the edge, before anything is stored.

A report that breaks one of these ends only its own stream, with a gRPC status that says
which field and why; everyone else's streams and everything stored stay as they were. The
bounds are far above any real job and low enough that one bad or hostile sender cannot
exhaust the collector's memory, overflow SQLite's 64-bit integers, or push a job's step
watermark so far ahead that the real steps behind it are never evaluated.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from modtrack.collector.records import STEP_FIGURES

MAX_WORLD_SIZE = 1 << 17  # 131,072 ranks
MAX_MODULES = 200_000  # names in one job's module table
MAX_NAME_CHARS = 1_000  # one module name
MAX_LABEL_CHARS = 256  # job and host names
MAX_STEP = 1 << 53
MAX_STEPS_AHEAD = 100_000  # beyond the job's newest evaluated step and the rank's own newest
MAX_DURATION_NS = 24 * 3600 * 10**9  # one day, for a step or any phase or module figure
MAX_ABS_TIME_NS = 1 << 62  # agent clock stamps and clock offsets: room to add them safely
MAX_BATCH_REPORTS = 1024  # StepReports in one StepReportBatch (the agent sends at most 256; bytes are bounded too)


class Refused(Exception):
    """The one refusal: ends the sender's stream with `code` (INVALID_ARGUMENT unless said) and
    this message; nothing of the refused message is stored. `step`: the report refused, when it is
    one (sent back in the trailing metadata, so the agent drops that step and replays the rest)."""

    def __init__(self, code: grpc.StatusCode, message: str, step: int | None = None):
        super().__init__(message)
        self.code = code
        self.step = step


def invalid(message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


def _label(kind: str, value: str) -> None:
    if len(value) > MAX_LABEL_CHARS or not value.isprintable():
        raise invalid(f"Hello: {kind} must be at most {MAX_LABEL_CHARS} printable characters")


def check_hello(h, access) -> None:
    """The one check of a Hello: protocol, job, rank within the world, bounds, and whether the
    stream's token may write this job."""
    if h.protocol_version not in (0, 1):
        raise invalid(f"protocol_version {h.protocol_version} is not supported (want 1)")
    if not h.job:
        raise invalid("Hello without a job name")
    if h.world_size < 1 or h.rank >= h.world_size:
        raise invalid(f"Hello: rank {h.rank} is outside world_size {h.world_size}")
    _label("job", h.job)
    _label("host", h.host)
    if access is not None and h.job and not access.allows(h.job):
        raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"this token may not write job {h.job!r}")
    if h.world_size > MAX_WORLD_SIZE:
        raise invalid(f"Hello: world_size {h.world_size} is over the limit of {MAX_WORLD_SIZE}")
    check_names(h.module_names, "Hello")


def check_names(names, where: str) -> None:
    if len(names) > MAX_MODULES:
        raise Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"{where}: {len(names)} module names, over the limit of {MAX_MODULES}"
        )
    if names and max(map(len, names)) > MAX_NAME_CHARS:
        raise invalid(f"{where}: a module name is longer than {MAX_NAME_CHARS} characters")


def check_table_growth(job_state, names) -> None:
    """Refuse names that would grow the job's module table past MAX_MODULES."""
    have = len(job_state.names)
    if have + len(names) <= MAX_MODULES:
        return
    new = sum(1 for n in set(names) if n not in job_state.ids)
    if have + new > MAX_MODULES:
        raise Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"job {job_state.job!r}: module table would grow past {MAX_MODULES} names",
        )


def check_batch(reports) -> None:
    """A StepReportBatch holds 1 to MAX_BATCH_REPORTS reports."""
    if not len(reports):
        raise invalid("an empty StepReportBatch")
    if len(reports) > MAX_BATCH_REPORTS:
        raise Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"a StepReportBatch of {len(reports)} reports, over the limit of {MAX_BATCH_REPORTS}",
        )


def check_report(report, newest_step: int, job_last_evaluated: int) -> int:
    """Scalar bounds of a StepReport; returns the rank's newest step including this one."""
    where = f"step {report.step}"
    if report.step > MAX_STEP:
        raise invalid(f"{where}: over the limit of 2^53")
    base = max(newest_step, job_last_evaluated)
    if base >= 0 and report.step > base + MAX_STEPS_AHEAD:
        raise invalid(f"{where}: more than {MAX_STEPS_AHEAD} steps ahead of step {base}")
    for name in ("start_ns", "end_ns"):
        if abs(getattr(report, name)) > MAX_ABS_TIME_NS:
            raise invalid(f"{where}: {name} is out of range")
    if report.end_ns - report.start_ns > MAX_DURATION_NS:
        raise invalid(f"{where}: lasts more than a day")
    for name in STEP_FIGURES[2:]:  # the durations (after start_ns and end_ns)
        if getattr(report, name) > MAX_DURATION_NS:
            raise invalid(f"{where}: {name} {getattr(report, name)} is more than a day")
    check_names(report.new_module_names, where)
    return max(newest_step, report.step)


_NONE = np.zeros(0, np.int64)


def column_problem(durations: np.ndarray, stamps: np.ndarray) -> str | None:
    """The bounds of per-module columns, vectorized over arrays of any shape: durations in
    [0, a day], clock stamps in range. None when both hold, else what is wrong."""
    if durations.size:
        if durations.min() < 0:
            return f"negative duration {int(durations.min())}"
        if durations.max() > MAX_DURATION_NS:
            return f"a duration of {int(durations.max())} ns is more than a day"
    if stamps.size and (stamps.min() < -MAX_ABS_TIME_NS or stamps.max() > MAX_ABS_TIME_NS):
        return "a clock stamp is out of range"
    return None


def check_columns(where: str, durations, stamps) -> None:
    """column_problem for each array in turn, raised with `where`: the first problem found."""
    for problem in (*(column_problem(a, _NONE) for a in durations), *(column_problem(_NONE, a) for a in stamps)):
        if problem is not None:
            raise invalid(f"{where}: {problem}")


def check_offset(offset_ns: int) -> None:
    if abs(offset_ns) > MAX_ABS_TIME_NS:
        raise invalid(f"clock offset {offset_ns} is out of range")


async def checked_messages(messages, hello_timeout_s: float):
    """The stream's messages, refused cleanly: DEADLINE_EXCEEDED when the first one (the
    Hello) is late, INVALID_ARGUMENT for bytes that are no AgentMessage."""
    it = messages.__aiter__()
    timeout: float | None = hello_timeout_s
    while True:
        try:
            message = await asyncio.wait_for(it.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise Refused(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no Hello within {hello_timeout_s:g} s of opening the stream"
            ) from None
        except DecodeError as exc:
            raise invalid(f"undecodable message: {exc}") from None
        timeout = None
        yield message
