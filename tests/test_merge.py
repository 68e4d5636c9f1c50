"""Step assembly: job-wide module columns, NaN where a rank did not run, watermark, missing ranks."""

from __future__ import annotations

import numpy as np

from harness.step_row import row
from modtrack.collector.pipeline.merge import JobState, Merger, build_matrix


def test_matrix_lines_up_columns_across_ranks_with_nan_for_modules_not_run():
    state = JobState("j", 2, ["a", "b", "c"])
    state.ranks = {}
    m = Merger()
    m.jobs["j"] = state
    m.hello("j", 0, 2, "h0")
    m.hello("j", 1, 2, "h1")
    rows = {
        1: row("j", 1, 5, [2, 0], [1, 1], [7.0, 1.5], wall_ms=20, tail_ms=4),  # pipeline stage
        0: row("j", 0, 5, [0, 1, 0], [1, 1, 2], [1.0, 2.0, 3.0]),
    }
    matrix = build_matrix(state, 5, rows)
    assert matrix.ranks.tolist() == [0, 1] and matrix.hosts == ["h0", "h1"]
    assert list(zip(matrix.column_module.tolist(), matrix.column_phase.tolist())) == [(0, 1), (0, 2), (1, 1), (2, 1)]
    np.testing.assert_array_equal(matrix.self_ms, [[1.0, 3.0, 2.0, np.nan], [1.5, np.nan, np.nan, 7.0]])
    assert matrix.wall_ms.tolist() == [10.0, 20.0] and matrix.sync_wait_ms.tolist() == [1.0, 4.0]
    assert matrix.forward_ms.tolist() == [2.0, 2.0] and matrix.module_names == ["a", "b", "c"]


def test_step_waits_for_every_live_rank_then_the_watermark():
    m = Merger(watermark_s=2.0, missing_after_s=30.0)
    for r in range(3):
        m.hello("j", r, 3, f"h{r}")
    m.add(row("j", 0, 0, [0], [1], [1.0]))
    m.add(row("j", 1, 0, [0], [1], [1.0]))
    now = m.jobs["j"].pending[0].first_seen
    assert m.due(now + 0.1) == ([], [])  # rank 2 is live and has not reported
    m.add(row("j", 2, 0, [0], [1], [1.0]))
    ready, _ = m.due(now + 0.1)
    assert [(r.step, sorted(r.rows)) for r in ready] == [(0, [0, 1, 2])]
    # Step 1 without rank 2: evaluated once the watermark passes, with the ranks that came.
    m.add(row("j", 0, 1, [0], [1], [1.0]))
    m.add(row("j", 1, 1, [0], [1], [1.0]))
    first = m.jobs["j"].pending[1].first_seen
    assert m.due(first + 1.9)[0] == []
    ready, _ = m.due(first + 2.0)
    assert [(r.step, sorted(r.rows)) for r in ready] == [(1, [0, 1])]
    assert not m.add(row("j", 2, 1, [0], [1], [1.0]))  # late: stored elsewhere, not merged again


def test_silent_rank_is_marked_missing_and_not_waited_for():
    m = Merger(watermark_s=100.0, missing_after_s=5.0)
    m.hello("j", 0, 2, "h0")
    m.hello("j", 1, 2, "h1")
    m.add(row("j", 0, 0, [0], [1], [1.0]))
    start = m.jobs["j"].ranks[1].last_seen
    assert m.due(start + 1) == ([], [])
    m.jobs["j"].ranks[0].last_seen = start + 5  # rank 0 keeps reporting
    ready, missing = m.due(start + 6)
    assert missing == [("j", 1)] and [r.step for r in ready] == [0]
    assert m.jobs["j"].live_ranks() == 1
    m.add(row("j", 1, 1, [0], [1], [1.0]))  # it comes back: live again
    assert m.jobs["j"].ranks[1].state == "live"


def test_steps_of_a_job_are_evaluated_in_order():
    m = Merger(watermark_s=1.0)
    m.hello("j", 0, 1, "h0")
    for step in (3, 1, 2):
        m.add(row("j", 0, step, [0], [1], [1.0]))
    ready, _ = m.due(m.jobs["j"].pending[3].first_seen)
    assert [r.step for r in ready] == [1, 2, 3]


def test_a_second_report_of_a_pending_step_is_ignored_as_the_store_ignores_it():
    m = Merger()
    m.hello("j", 0, 1, "h0")
    assert m.add(row("j", 0, 3, [0], [1], [1.0], wall_ms=20))
    assert m.add(row("j", 0, 3, [0], [1], [9.0], wall_ms=90))  # same key, other figures: the store keeps the first
    ready, _ = m.due(m.jobs["j"].pending[3].first_seen)
    assert [r.step for r in ready] == [3]
    assert ready[0].rows[0].figures["end_ns"] == 20_000_000
