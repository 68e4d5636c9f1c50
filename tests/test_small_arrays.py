"""The collector's small-array medians and NaN fills give numpy's own answers (they replace numpy's on hot paths)."""

import warnings

import numpy as np
import pytest

from modtrack.collector.small_arrays import (
    excess_sums,
    median,
    nan_column_medians,
    nan_median,
    nan_to,
    pair_medians,
    row_percentiles,
)


@pytest.mark.parametrize("n", range(9))
def test_same_as_numpy_with_and_without_nans(n):
    rng = np.random.default_rng(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns on empty and all-NaN slices
        for trial in range(100):
            a = rng.normal(size=n)
            if n and trial % 2:
                a[rng.integers(n)] = np.nan
            assert np.allclose(median(a), np.median(a) if n else np.nan, equal_nan=True)
            assert np.allclose(nan_median(a), np.nanmedian(a) if n else np.nan, equal_nan=True)
            assert np.array_equal(nan_to(a, -1.0), np.nan_to_num(a, nan=-1.0))
            if not n:
                continue
            b = rng.normal(size=(n, 6))
            b[rng.random((n, 6)) < 0.3] = np.nan
            assert np.allclose(nan_column_medians(b), np.nanmedian(b, axis=0), equal_nan=True)
            if n == 2:  # the two-rank shortcut: the general path's answer bit for bit
                assert np.array_equal(pair_medians(b), nan_column_medians(b), equal_nan=True)
            med = np.nanmedian(b, axis=0)
            assert np.array_equal(excess_sums(b, med), np.nansum(np.clip(b - med, 0.0, None), axis=1))
            assert np.allclose(row_percentiles(b.T, 40), np.nanpercentile(b.T, 40, axis=1), equal_nan=True)


def test_percentiles_of_rows_of_nothing_are_nan_as_numpys():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(
            row_percentiles(np.zeros((3, 0)), 40), np.nanpercentile(np.zeros((3, 0)), 40, axis=1), equal_nan=True
        )


def test_nan_to_leaves_its_input_alone():
    a = np.array([1.0, np.nan])
    out = nan_to(a)
    assert out.tolist() == [1.0, 0.0] and np.isnan(a[1])
