"""Sampled mode (agents time every module only on every Nth step): what the detector judges in between.

A step without module detail still has its step-level figures (wall, forward, backward, tail, data,
optimizer), judged as measured. Its module columns are held from the steps that had detail: for each rank
and column, the smaller of its last two measured values, so a module counts as slow between samples only
when the last two samples agree (one spike in one sampled step is not repeated for N steps), and the
hysteresis of the episode book (k of n steps) keeps meaning what it means in full mode. A step where only
some ranks have detail (a rank that got the new sampling a step later) is judged as it is.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from modtrack.collector.records import N_PHASES, StepMatrix, column_key


class HeldDetail:
    """The module columns of a job's last two steps with detail, to judge the steps between them."""

    def __init__(self) -> None:
        self.keys = np.empty(0, np.int64)  # column keys of the held columns
        self.ranks = np.empty(0, np.int64)
        self.held: np.ndarray | None = None  # (R, K) elementwise min of the last two detailed steps
        self.last: np.ndarray | None = None  # (R, K) the last detailed step's self times

    def fill(self, m: StepMatrix) -> StepMatrix:
        """`m` itself when every rank has detail (remembered), else `m` with the held module columns."""
        if m.detail is None:
            self._remember(m)
            return m
        if m.detail.any() or self.held is None:
            return m  # some ranks have detail: they are judged among themselves this step
        ranks = np.asarray(m.ranks, np.int64)
        rows = np.searchsorted(self.ranks, ranks)
        found = (rows < len(self.ranks)) & (self.ranks[np.minimum(rows, len(self.ranks) - 1)] == ranks)
        self_ms = np.full((len(ranks), len(self.keys)), np.nan)
        self_ms[found] = self.held[rows[found]]
        filled = replace(
            m,
            column_module=self.keys // N_PHASES,
            column_phase=self.keys % N_PHASES,
            self_ms=self_ms,
        )
        if m.cpu_clock and m.forward_ms is not None and m.backward_ms is not None:
            with np.errstate(invalid="ignore"):
                computing = np.nansum(self_ms, axis=1)
            filled.idle_ms = np.maximum(m.forward_ms + m.backward_ms - computing, m.sync_wait_ms)
        return filled

    def _remember(self, m: StepMatrix) -> None:
        keys = column_key(np.asarray(m.column_module, np.int64), np.asarray(m.column_phase, np.int64))
        ranks = np.asarray(m.ranks, np.int64)
        x = np.asarray(m.self_ms, np.float64)
        previous = self._aligned(ranks, keys)
        self.keys, self.ranks, self.last = keys, ranks, x
        with np.errstate(invalid="ignore"):
            self.held = x if previous is None else np.fmin(x, previous)  # fmin: a column new now is held as is

    def _aligned(self, ranks: np.ndarray, keys: np.ndarray) -> np.ndarray | None:
        """The last detailed step's self times laid out like (ranks, keys); None before the first."""
        if self.last is None:
            return None
        if np.array_equal(ranks, self.ranks) and np.array_equal(keys, self.keys):
            return self.last
        out = np.full((len(ranks), len(keys)), np.nan)
        _, nr, orr = np.intersect1d(ranks, self.ranks, assume_unique=True, return_indices=True)
        _, nc, oc = np.intersect1d(keys, self.keys, assume_unique=True, return_indices=True)
        out[nr[:, None], nc] = self.last[orr[:, None], oc]
        return out
