"""numpy's median, nanmedian, nanpercentile and nan_to_num, for the handful of ranks a step has.

numpy's own cost 10-40 µs per call on a few values (argument handling, partition, NaN scans, inf checks,
warnings), and nanpercentile goes row by row once a NaN is present; one step's evaluation asks for dozens
of them, and evaluating every step is the collector's largest CPU cost per step (measured on a 2-rank job:
~0.9 of its 1.7 ms). These do the same by one sort or one mask. np.sort puts NaN last, which the medians rely on.
"""

from __future__ import annotations

import numpy as np


def median(values) -> float:
    """np.median of a 1-D sequence: NaN if it holds a NaN (or nothing)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = len(ordered)
    if n == 0 or np.isnan(ordered[-1]):
        return float("nan")
    return 0.5 * float(ordered[(n - 1) // 2] + ordered[n // 2])


def nan_median(values) -> float:
    """np.nanmedian of a 1-D sequence: the median of its numbers, NaN if it has none."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = len(ordered) - int(np.count_nonzero(np.isnan(ordered)))
    if n == 0:
        return float("nan")
    return 0.5 * float(ordered[(n - 1) // 2] + ordered[n // 2])


def column_medians(sorted_cols: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Median of each column of an axis-0-sorted array whose NaNs sit at the bottom (count: numbers per column)."""
    k = np.arange(sorted_cols.shape[1])
    lo = np.maximum((count - 1) // 2, 0)
    hi = np.maximum(count // 2, 0)
    if sorted_cols.shape[0] == 0:
        return np.full(sorted_cols.shape[1], np.nan)
    med = 0.5 * (sorted_cols[lo, k] + sorted_cols[hi, k])
    med[count == 0] = np.nan
    return med


def pair_medians(a: np.ndarray) -> np.ndarray:
    """column_medians of a 2-row array, bit for bit: per column 0.5 * (smaller + larger) of its numbers (one
    number: 0.5 * (v + v); none: NaN), as np.fmin and np.fmax skip a NaN. Four ufuncs instead of a sort and
    the gathers (~5 µs each on a few values)."""
    return 0.5 * (np.fmin(a[0], a[1]) + np.fmax(a[0], a[1]))


def nan_column_medians(a: np.ndarray) -> np.ndarray:
    """np.nanmedian(a, axis=0) of a 2-D array, without numpy's per-column path for columns holding NaN."""
    return column_medians(np.sort(a, axis=0), np.count_nonzero(~np.isnan(a), axis=0))


def row_percentiles(a: np.ndarray, q: float) -> np.ndarray:
    """np.nanpercentile(a, q, axis=1) (linear interpolation), vectorised over the rows; NaN for a row of nothing."""
    if a.shape[1] == 0:  # a step with no module columns (sampled mode before its first step with detail)
        return np.full(len(a), np.nan)
    ordered = np.sort(a, axis=1)
    n = np.count_nonzero(~np.isnan(a), axis=1)
    pos = np.maximum(n - 1, 0) * (q / 100.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
    rows = np.arange(len(a))
    below, above = ordered[rows, lo], ordered[rows, hi]
    out = below + (above - below) * (pos - lo)
    return np.where(n > 0, out, np.nan)


def nan_to(values, fill: float = 0.0) -> np.ndarray:
    """np.nan_to_num(values, nan=fill) as float64 for finite figures (the edge lets no infinity in): a new array."""
    out = np.array(values, dtype=np.float64)
    out[np.isnan(out)] = fill
    return out


def excess_sums(x: np.ndarray, median: np.ndarray) -> np.ndarray:
    """Per row, the sum of x above the column medians: np.nansum(np.clip(x - median, 0, None), axis=1).
    NaN (a column the rank did not run) counts 0; NaN arithmetic and comparisons raise no floating-point flag."""
    over = x - median
    return np.where(over > 0.0, over, 0.0).sum(axis=1)
