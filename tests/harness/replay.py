"""A stored job's steps as the detector saw them, kept as a small fixture and judged again offline.

A real torchrun job's per-rank figures (the SQLite a collector wrote) become the StepMatrix of each step,
as the merge builds them; `save` writes them to one .npz (a few kB per job), `load` reads them back, and
`judge` runs a fresh detector over them. A verdict that went wrong on a real job is then a unit test on
that job's own figures, not on figures made up to look like it.
"""

from __future__ import annotations

import io
import json

import numpy as np

from modtrack.collector.pipeline.detector import Detector, DetectorParams, params_for_clock
from modtrack.collector.pipeline.merge import JobSnapshot, build_matrix
from modtrack.collector.records import MODULE_COLUMNS, STEP_FIGURES, Episode, StepMatrix, StepRow
from modtrack.collector.store.sqlite import Store

ARRAYS = ("ranks", "column_module", "column_phase", "self_ms", "wall_ms", "sync_wait_ms", "forward_ms")
ARRAYS += ("backward_ms", "data_ms", "optimizer_ms", "idle_ms")


def stored_matrices(data_dir: str, job: str, attempt: int | None = None) -> list[StepMatrix]:
    """Every stored step of a job's attempt (the latest by default), as the merge would build it."""
    store = Store(data_dir)
    try:
        attempt = store.latest_attempt(job) if attempt is None else attempt
        hosts = {r["rank"]: r["host"] or "" for r in store.ranks(job)}
        snapshot = JobSnapshot(job, store.module_names(job), hosts, cpu_clock=True, attempt=attempt)
        by_step: dict[int, dict[int, dict]] = {}
        for step, rank, *figures in store.last_steps(job, 1_000_000, attempt):
            by_step.setdefault(step, {})[rank] = dict(zip(STEP_FIGURES, figures))
        matrices = []
        for step in sorted(by_step):
            modules = store.step_modules(job, step, attempt)
            rows = {
                rank: StepRow(job, rank, step, figures, modules[rank], attempt=attempt)
                for rank, figures in by_step[step].items()
                if rank in modules and len(modules[rank][MODULE_COLUMNS[0][0]])
            }
            if rows:
                matrices.append(build_matrix(snapshot, step, rows))
        return matrices
    finally:
        store.close()


def save(path: str, matrices: list[StepMatrix]) -> None:
    """One .npz: each step's arrays under "<i>/<name>", and the job, steps, hosts and names as JSON."""
    arrays = {f"{i}/{name}": getattr(m, name) for i, m in enumerate(matrices) for name in ARRAYS}
    meta = {
        "job": matrices[0].job if matrices else "",
        "steps": [m.step for m in matrices],
        "hosts": [list(m.hosts) for m in matrices],
        "names": list(matrices[0].module_names) if matrices else [],
        "attempt": matrices[0].attempt if matrices else 0,
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def load(path: str) -> list[StepMatrix]:
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes())
        return [
            StepMatrix(
                job=meta["job"],
                step=step,
                hosts=meta["hosts"][i],
                module_names=meta["names"],
                attempt=meta["attempt"],
                **{name: z[f"{i}/{name}"] for name in ARRAYS},
            )
            for i, step in enumerate(meta["steps"])
        ]


def judge(matrices: list[StepMatrix], params: DetectorParams | None = None) -> list[Episode]:
    """Every episode a fresh detector (CPU-clock params) opens over these steps, as they end."""
    detector = Detector(matrices[0].job if matrices else "", params_for_clock(params or DetectorParams(), True))
    episodes: dict[int, Episode] = {}
    for m in matrices:
        for ep in detector.observe(m):
            episodes[id(ep)] = ep
    return list(episodes.values())
