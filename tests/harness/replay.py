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

from modtrack.collector.pipeline.collectives import CollectiveBook, take_out_waits
from modtrack.collector.pipeline.detector import Detector, DetectorParams, params_for_clock
from modtrack.collector.pipeline.merge import JobSnapshot, build_matrix
from modtrack.collector.records import CLOCK_KIND_CUDA, MODULE_COLUMNS, STEP_FIGURES, Episode, StepMatrix, StepRow
from modtrack.collector.store.sqlite import Store

STACKED = ("self_ms", "wall_ms", "sync_wait_ms", "forward_ms", "backward_ms", "data_ms", "optimizer_ms", "idle_ms")
STACKED += ("host_ms",)


def stored_matrices(
    data_dir: str, job: str, attempt: int | None = None, collectives: bool = True, sampled: bool = False
) -> list[StepMatrix]:
    """Every stored step of a job's attempt (the latest by default), as the merge would build it and, where the
    job sent collective stats (and `collectives`), with its collective waits taken out as the evaluator does:
    each step once its own stats are in (the evaluator holds it for them), the ranks' module windows where
    their durations hold the waits (wall clock, CUDA). `sampled`: a job in sampled mode, whose rows without
    module figures are steps without detail (step figures only), judged as the collector judged them."""
    store = Store(data_dir)
    try:
        attempt = store.latest_attempt(job) if attempt is None else attempt
        ranks = store.ranks(job)
        hosts = {r["rank"]: r["host"] or "" for r in ranks}
        waits_in_modules = {r["rank"] for r in ranks if r["wall_durations"] or r["clock_kind"] == CLOCK_KIND_CUDA}
        snapshot = JobSnapshot(job, store.module_names(job), hosts, cpu_clock=True, attempt=attempt)
        by_step: dict[int, dict[int, dict]] = {}
        for step, rank, *figures in store.last_steps(job, 1_000_000, attempt):
            by_step.setdefault(step, {})[rank] = dict(zip(STEP_FIGURES, figures))
        stats: dict[int, list] = {}
        for rank, offset, s in store.collective_stats(job, attempt) if collectives else []:
            stats.setdefault(s.step, []).append((rank, offset, s))
        offsets = store.clock_offsets(job, attempt)
        book = CollectiveBook() if stats else None
        matrices = []
        for step in sorted(by_step):
            modules = store.step_modules(job, step, attempt)
            rows = {
                rank: StepRow(job, rank, step, figures, modules[rank], attempt=attempt)
                for rank, figures in by_step[step].items()
                if rank in modules and len(modules[rank][MODULE_COLUMNS[0][0]])
            }
            if sampled:
                none = {name: np.zeros(0, dtype) for name, dtype in MODULE_COLUMNS}
                for rank, figures in by_step[step].items():
                    if rank not in rows:
                        rows[rank] = StepRow(job, rank, step, figures, none, attempt=attempt, detail=False)
            if book is not None:
                for rank, offset, s in stats.pop(step, []):
                    book.add(job, attempt, rank, offset, [s])
                for rank, row in rows.items():
                    if rank in waits_in_modules:
                        book.add_windows(job, attempt, rank, offsets.get((step, rank), 0), step, row.modules)
            if rows:
                matrix = build_matrix(snapshot, step, rows)
                if book is not None:
                    take_out_waits(matrix, book.module_waits(job, step), book.recent_waits(job))
                matrices.append(matrix)
        return matrices
    finally:
        store.close()


def world_size(data_dir: str, job: str) -> int:
    store = Store(data_dir)
    try:
        row = store.job(job)
        assert row is not None, f"no job {job!r} in {data_dir}"
        return row["world_size"]
    finally:
        store.close()


def save(path: str, matrices: list[StepMatrix]) -> None:
    """One .npz: each figure stacked over the steps (steps x ranks x columns), the rest as JSON. The steps must
    share their ranks and columns (a job whose modules and ranks stay put, as a fixture's should)."""
    first = matrices[0]
    for m in matrices:
        assert np.array_equal(m.ranks, first.ranks) and np.array_equal(m.column_module, first.column_module)
    arrays = {
        name: np.stack([np.asarray(getattr(m, name), np.float32) for m in matrices]) for name in STACKED
    }  # µs kept
    meta = {
        "job": first.job,
        "steps": [m.step for m in matrices],
        "hosts": list(first.hosts),
        "names": list(first.module_names),
        "attempt": first.attempt,
        "ranks": first.ranks.tolist(),
        "column_module": first.column_module.tolist(),
        "column_phase": first.column_phase.tolist(),
        "cpu_clock": bool(first.cpu_clock),
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def load(path: str) -> list[StepMatrix]:
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes())
        stacked = {name: z[name] for name in STACKED}
    return [
        StepMatrix(
            job=meta["job"],
            step=step,
            ranks=np.array(meta["ranks"], np.int64),
            hosts=list(meta["hosts"]),
            column_module=np.array(meta["column_module"], np.int64),
            column_phase=np.array(meta["column_phase"], np.int64),
            module_names=meta["names"],
            attempt=meta["attempt"],
            cpu_clock=meta.get("cpu_clock", True),  # the fixtures before it: CPU-clock jobs of examples/train.py
            **{name: stacked[name][i].astype(np.float64) for name in STACKED},
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
