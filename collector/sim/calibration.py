"""The simulator's noise as measured on real jobs, so that its detection figures rest on more than an assumption.

The cluster model's own noise (log-normal jitter of 2-5 %, rare spikes) is what the detector was written
against. Real steps with no straggler in them (a kept job's steps before its onset, or a clean job's) say
what the noise really is: per step, each rank's log deviation from its column's median, split into the rank's
own deviation as a whole (the median over its columns) and what is left per cell. The cluster model then draws
from these two samples (a bootstrap), spikes and heavy tails included, instead of from its parametric noise.
A cell's noise depends on its module's size: measured on CPU ranks sharing 2 cores, 7 % of the cells of
modules of 0.05-0.1 ms were 1.5x their median, 0.5 % of those of 1-2 ms, 0.07 % of those of 2-5 ms. So each
simulated column draws from the real cells nearest to it in size (its `NEAREST` neighbours by median time).

With an odd number of ranks the median rank of a column deviates by exactly 0 there; those zeros are left out
(they are the estimator's, not the job's), which makes the sample slightly wider than the job's noise.
Columns whose median is below `min_ms` are left out: a module that does next to nothing is timed to the
clock's resolution, and the simulator's modules all do some work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modtrack.collector.records import StepMatrix
from modtrack.collector.small_arrays import nan_column_medians, row_percentiles

NEAREST = 500  # real cells a simulated column draws from (those whose column medians are nearest its size) ...
NEAREST_SHARE = 0.05  # ... at most this share of them all, so that a small sample still tells sizes apart


@dataclass
class MeasuredNoise:
    cell: np.ndarray  # log deviations of cells from their column median, the rank's own deviation taken out
    cell_ms: np.ndarray  # ... the median of each one's column (ascending: cell is sorted by it)
    rank: np.ndarray  # log deviations of a rank as a whole (the median over its cells) per step
    steps: int

    def draw(self, rng: np.random.Generator, base_ms: np.ndarray, ranks: int) -> np.ndarray:
        """(ranks, columns) multiplicative noise of one step, for columns of these sizes."""
        near = max(1, min(NEAREST, int(NEAREST_SHARE * len(self.cell))))
        at = np.searchsorted(self.cell_ms, base_ms)
        lo = np.clip(at - near // 2, 0, len(self.cell) - near)
        pick = lo[None, :] + (rng.random((ranks, len(base_ms))) * near).astype(np.int64)
        return np.exp(self.cell[pick] + rng.choice(self.rank, size=(ranks, 1)))

    def summary(self) -> dict[str, float]:
        """The figures a reader compares with the simulator's own noise."""
        cell, rank = self.cell, self.rank
        spread = 1.4826 * float(np.median(np.abs(cell - np.median(cell)))) if len(cell) else float("nan")
        out = {"steps": float(self.steps), "cells": float(len(cell)), "cell_robust_sigma": spread}
        for times in (1.2, 1.5, 2.0):
            out[f"cells_over_{times}x"] = float(np.mean(cell > np.log(times))) if len(cell) else float("nan")
        out["ranks_over_1.1x"] = float(np.mean(rank > np.log(1.1))) if len(rank) else float("nan")
        return out


def measure_noise(matrices: list[StepMatrix], min_ms: float = 0.05, min_ranks: int = 3) -> MeasuredNoise:
    """The noise of steps with no straggler (the caller picks them), from jobs of at least `min_ranks` ranks."""
    cells, sizes, ranks, steps = [], [], [], 0
    for m in matrices:
        x = np.asarray(m.self_ms, dtype=np.float64)
        if x.shape[0] < min_ranks:
            continue
        with np.errstate(all="ignore"):
            median = nan_column_medians(x) if x.size else np.zeros(x.shape[1])
            keep = (np.count_nonzero(~np.isnan(x), axis=0) >= min_ranks) & (median >= min_ms)
            dev = np.log(x[:, keep] / median[keep])
        dev[dev == 0.0] = np.nan  # a column's median rank (odd counts): the estimator's zero
        dev[~np.isfinite(dev)] = np.nan
        whole = row_percentiles(dev, 50.0)  # each rank's median over its columns
        rest = dev - whole[:, None]
        cells.append(rest[~np.isnan(rest)])
        sizes.append(np.broadcast_to(median[keep], rest.shape)[~np.isnan(rest)])
        ranks.append(whole[~np.isnan(whole)])
        steps += 1
    cell = np.concatenate(cells) if cells else np.zeros(0)
    size = np.concatenate(sizes) if sizes else np.zeros(0)
    order = np.argsort(size, kind="stable")
    return MeasuredNoise(
        cell=cell[order],
        cell_ms=size[order],
        rank=np.concatenate(ranks) if ranks else np.zeros(0),
        steps=steps,
    )
