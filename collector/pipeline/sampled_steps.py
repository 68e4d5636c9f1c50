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
from typing import TYPE_CHECKING

import numpy as np

from modtrack.collector.records import N_PHASES, StepMatrix, column_key, idle_less_gc

if TYPE_CHECKING:
    from modtrack.collector.pipeline.detector import StepFlags

_Layout = tuple[np.ndarray, np.ndarray, np.ndarray]  # (ranks, column keys, (R, K) values)


class HeldDetail:
    """The module columns of a job's last two steps with detail, to judge the steps between them. A step with
    detail is only kept (most steps have it); the held columns are worked out when a step without needs them."""

    def __init__(self) -> None:
        self._last: StepMatrix | None = None  # the last step with detail from every rank
        self._before: StepMatrix | None = None  # ... and the one before it
        self._held: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (ranks, keys, held) of those two
        # the detector's module-cell flags in those two steps: (ranks, keys, bits 1 flagged, 2 held)
        self._last_flags: _Layout | None = None
        self._before_flags: _Layout | None = None

    def fill(self, m: StepMatrix) -> StepMatrix:
        """`m` itself when every rank has detail (remembered), else `m` with the held module columns."""
        if m.detail is None:
            self._before, self._last, self._held = self._last, m, None
            return m
        if m.detail.any() or self._last is None:
            return m  # some ranks have detail: they are judged among themselves this step
        held_ranks, keys, held = self._held_columns()
        ranks = np.asarray(m.ranks, np.int64)
        rows = np.searchsorted(held_ranks, ranks)
        found = (rows < len(held_ranks)) & (held_ranks[np.minimum(rows, len(held_ranks) - 1)] == ranks)
        self_ms = np.full((len(ranks), len(keys)), np.nan)
        self_ms[found] = held[rows[found]]
        filled = replace(
            m,
            column_module=keys // N_PHASES,
            column_phase=keys % N_PHASES,
            self_ms=self_ms,
        )
        if m.cpu_clock and m.forward_ms is not None and m.backward_ms is not None:
            with np.errstate(invalid="ignore"):
                computing = np.nansum(self_ms, axis=1)
            filled.idle_ms = np.maximum(idle_less_gc(m.forward_ms + m.backward_ms - computing, m.gc_ms), m.sync_wait_ms)
        return filled

    def judged(self, m: StepMatrix, flags: StepFlags) -> None:
        """After the detector judged `m` (what fill() returned): a step with detail from every rank has its
        module-cell flags remembered; on a step with held columns a module cell stays flagged, or held, only
        where it was in both samples behind it (none while there is only one)."""
        k = np.asarray(m.self_ms).shape[1]  # module columns first, the step-level columns after
        if m.detail is None:
            ranks, keys, _ = _layout(m)
            marks = flags.flagged[:, :k] * 1.0 + flags.held[:, :k] * 2.0
            self._before_flags, self._last_flags = self._last_flags, (ranks, keys, marks)
            return
        if m.detail.any() or self._last is None:
            return  # judged as it came (fill left it alone)
        if self._last_flags is None or self._before_flags is None:
            flags.flagged[:, :k] = False
            flags.held[:, :k] = False
            return
        ranks, keys, _ = _layout(m)
        last, before = (
            np.nan_to_num(_aligned(f, ranks, keys)).astype(np.int64) for f in (self._last_flags, self._before_flags)
        )
        agreed = last & before  # bits: 1 flagged, 2 held (a cell absent from a sample agrees on nothing)
        flags.flagged[:, :k] &= (agreed & 1).astype(bool)
        flags.held[:, :k] &= (agreed & 2).astype(bool)

    def _held_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ranks, column keys, (R, K) elementwise min of the last two detailed steps), laid out like the last."""
        if self._held is None:
            assert self._last is not None
            ranks, keys, x = _layout(self._last)
            if self._before is None:
                held = x
            else:
                with np.errstate(invalid="ignore"):  # fmin: a column new in the last step is held as is
                    held = np.fmin(x, _aligned(_layout(self._before), ranks, keys))
            self._held = (ranks, keys, held)
        return self._held


def _layout(m: StepMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = column_key(np.asarray(m.column_module, np.int64), np.asarray(m.column_phase, np.int64))
    return np.asarray(m.ranks, np.int64), keys, np.asarray(m.self_ms, np.float64)


def _aligned(before: tuple[np.ndarray, np.ndarray, np.ndarray], ranks: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """An earlier detailed step's self times laid out like (ranks, keys)."""
    old_ranks, old_keys, old = before
    if np.array_equal(ranks, old_ranks) and np.array_equal(keys, old_keys):
        return old
    out = np.full((len(ranks), len(keys)), np.nan)
    _, nr, orr = np.intersect1d(ranks, old_ranks, assume_unique=True, return_indices=True)
    _, nc, oc = np.intersect1d(keys, old_keys, assume_unique=True, return_indices=True)
    out[nr[:, None], nc] = old[orr[:, None], oc]
    return out
