"""The harness itself: fake ranks reach a real collector, and a wait fails at its deadline."""

from __future__ import annotations

import time

import pytest

from harness.fake_rank import FakeRank, stream_steps
from harness.http import get
from harness.waiting import wait_for


def test_reports_are_acked_and_queryable(collector):
    ranks = [FakeRank(collector.grpc_target, "job-a", i, 2) for i in range(2)]
    try:
        stream_steps(ranks, range(3))
        status, body = get(collector.url, "/api/v1/jobs/job-a/steps?last=10")
        assert status == 200
        assert [s["step"] for s in body["steps"]] == [0, 1, 2]
        assert [r["rank"] for r in body["steps"][0]["ranks"]] == [0, 1]
        assert body["steps"][0]["ranks"][1]["host"] == "host1"
        assert body["steps"][0]["ranks"][0]["wall_ms"] == pytest.approx(100.0)
        assert body["steps"][0]["ranks"][0]["forward_ms"] == pytest.approx(15.0)
        assert body["steps"][0]["ranks"][0]["sync_wait_ms"] == pytest.approx(1.0)
    finally:
        for r in ranks:
            r.close()
    assert all(r.error is None for r in ranks)


def test_wait_for_fails_at_its_deadline_saying_what_it_waited_for():
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"waited 0.2 s for the sky to fall: still up"):
        wait_for(lambda: False, 0.2, lambda: "the sky to fall: still up")
    assert 0.2 <= time.monotonic() - started < 2


def test_wait_for_returns_the_first_truthy_value_and_retries_only_what_it_is_told():
    answers = iter([ConnectionRefusedError(), 0, "ready"])

    def poll():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for(poll, 5, "an answer", interval=0, retry_on=(OSError,)) == "ready"
    with pytest.raises(ZeroDivisionError):
        wait_for(lambda: 1 / 0, 5, retry_on=(OSError,))
