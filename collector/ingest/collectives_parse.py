"""A StepReport's collective stats (wire field 17) checked at the edge and turned into numpy columns.

A bad entry refuses the whole report (edge_limits.Refused, INVALID_ARGUMENT) with the group and the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modtrack.collector.ingest import edge_limits
from modtrack.collector.ingest.edge_limits import invalid

MAX_GROUPS = 256  # collective stats in one report (groups x steps it carries)
MAX_LISTED = 4096  # collectives listed per group and step


@dataclass
class GroupStep:
    """One rank's collectives of one process group in one step; times in ns, issue on the agent clock."""

    step: int
    group: str
    backend: str
    group_size: int
    ranks_hash: int
    count: int
    total_ns: int
    wait_ns: int
    bytes: int
    active_measured: bool
    unlisted: int
    seq: np.ndarray  # uint64
    issue_ns: np.ndarray  # int64
    active_ns: np.ndarray | None  # int64, or None where not measured


def parse_collectives(report, where: str) -> list[GroupStep]:
    out = []
    if len(report.collectives) > MAX_GROUPS:
        raise invalid(f"{where}: {len(report.collectives)} collective stats, over the limit of {MAX_GROUPS}")
    for c in report.collectives:
        at = f"{where} collectives of group {c.group[:64]!r} step {c.step}"
        if c.step > report.step:
            raise invalid(f"{at}: about a step after the report's own")
        if not c.group or len(c.group) > edge_limits.MAX_LABEL_CHARS or not c.group.isprintable():
            raise invalid(f"{at}: group must be 1 to {edge_limits.MAX_LABEL_CHARS} printable characters")
        if len(c.backend) > 32 or not c.backend.isprintable():
            raise invalid(f"{at}: backend must be at most 32 printable characters")
        if not 1 <= c.group_size <= edge_limits.MAX_WORLD_SIZE:
            raise invalid(f"{at}: group_size {c.group_size} is outside 1..{edge_limits.MAX_WORLD_SIZE}")
        n = len(c.seq)
        if n > MAX_LISTED:
            raise invalid(f"{at}: {n} collectives listed, over the limit of {MAX_LISTED}")
        if (
            len(c.issue_ns) != n
            or (c.active_measured and len(c.active_ns) != n)
            or (not c.active_measured and len(c.active_ns))
        ):
            raise invalid(f"{at}: seq, issue_ns and active_ns must have one entry per listed collective")
        if n + c.unlisted != c.count:
            raise invalid(f"{at}: count {c.count} is not listed {n} + unlisted {c.unlisted}")
        if (
            c.total_ns < 0
            or c.wait_ns < 0
            or c.total_ns > edge_limits.MAX_DURATION_NS
            or (c.wait_ns > edge_limits.MAX_DURATION_NS)
        ):
            raise invalid(f"{at}: total_ns and wait_ns must be within 0 and a day")
        issue = np.array(c.issue_ns, np.int64) if n else np.zeros(0, np.int64)
        active = np.array(c.active_ns, np.int64) if c.active_measured and n else None
        durations = (active,) if active is not None else ()
        edge_limits.check_columns(at, durations, (issue,))
        out.append(
            GroupStep(
                c.step,
                c.group,
                c.backend,
                c.group_size,
                c.ranks_hash,
                c.count,
                c.total_ns,
                c.wait_ns,
                c.bytes,
                c.active_measured,
                c.unlisted,
                np.array(c.seq, np.uint64) if n else np.zeros(0, np.uint64),
                issue,
                active,
            )
        )
    return out
