"""The HTTP API as CONTRACT.md promises it, fed by fake ranks over real gRPC."""

from __future__ import annotations

import pytest

from harness.collector_thread import CollectorThread
from harness.evaluated import wait_evaluated
from harness.fake_rank import FakeRank, stream_steps
from harness.http import get
from harness.slow_job import SLOW_RANK, run_slow_job
from harness.waiting import wait_for


def active_stragglers(url: str, job="train") -> list[dict]:
    status, body = get(url, f"/api/v1/jobs/{job}/stragglers")
    assert status == 200
    return [s for s in body["stragglers"] if s["state"] == "active"]


def test_slow_rank_is_listed_and_survives_a_restart(tmp_path):
    c = CollectorThread(tmp_path / "data")
    try:
        run_slow_job(c, range(10))
        wait_evaluated(c.url, 9)
        found = active_stragglers(c.url)
        assert {s["rank"] for s in found} == {SLOW_RANK}
        s = found[0]
        assert s["module"] == "Net.blocks.1" and s["host"] == "host2"
        assert s["slowdown"] == pytest.approx(1.5, rel=0.05)
        assert s["first_step"] <= 5 and s["cost_ms_per_step"] > 0
        _, alerts = get(c.url, "/api/v1/alerts")
        assert any(a["labels"]["rank"] == str(SLOW_RANK) and a["status"] == "firing" for a in alerts["alerts"])
        _, before = get(c.url, "/api/v1/jobs/train/steps?last=100")
    finally:
        c.stop()
    again = CollectorThread(tmp_path / "data")
    try:
        assert active_stragglers(again.url) == found  # history served from the same data dir
        _, after = get(again.url, "/api/v1/jobs/train/steps?last=100")
        assert after == before and len(after["steps"]) == 10
        _, jobs = get(again.url, "/api/v1/jobs")
        assert jobs["jobs"][0]["last_step"] == 9 and jobs["jobs"][0]["state"] == "stopped"
        # The job goes on: the restored episode continues (same id), no second one opens.
        run_slow_job(again, range(10, 14))
        wait_evaluated(again.url, 13)
        assert active_stragglers(again.url)[0]["last_step"] == 13
        assert [s["id"] for s in active_stragglers(again.url)] == [found[0]["id"]]
    finally:
        again.stop()


def test_jobs_steps_modules(collector):
    ranks = [FakeRank(collector.grpc_target, "j", i, 2) for i in range(2)]
    try:
        stream_steps(
            ranks, range(4), fwd_ms_of=lambda r, s: [1.0 + r, 2.0, 3.0, 4.0, 5.0 + s], gc_ns=2_500_000, gc_collections=1
        )
        wait_for(
            lambda: get(collector.url, "/api/v1/jobs")[1]["jobs"][0]["last_evaluated_step"] == 3,
            10,
            "the evaluation of step 3",
        )
        _, jobs = get(collector.url, "/api/v1/jobs")
        assert jobs == {
            "jobs": [
                {
                    "job": "j",
                    "world_size": 2,
                    "ranks_reporting": 2,
                    "last_step": 3,
                    "last_evaluated_step": 3,
                    "attempt": 0,
                    "state": "running",
                    "sample_every": None,  # sampled mode never set through the API
                }
            ]
        }
        _, steps = get(collector.url, "/api/v1/jobs/j/steps?last=2")
        assert [s["step"] for s in steps["steps"]] == [2, 3]
        assert set(steps["steps"][0]["ranks"][0]) >= {
            "rank",
            "host",
            "wall_ms",
            "forward_ms",
            "backward_ms",
            "sync_wait_ms",
        }
        assert [(r["gc_ms"], r["gc_collections"]) for r in steps["steps"][0]["ranks"]] == [(2.5, 1), (2.5, 1)]
        _, mods = get(collector.url, "/api/v1/jobs/j/modules")  # default: last evaluated step
        assert mods["step"] == 3 and len(mods["modules"]) == 10
        first = mods["modules"][0]
        assert (first["module"], first["phase"]) == ("Net", "forward")
        assert first["ms_by_rank"] == {"0": 1.0, "1": 2.0}
        _, mods1 = get(collector.url, "/api/v1/jobs/j/modules?step=1")
        head = [m for m in mods1["modules"] if m["module"] == "Net.head" and m["phase"] == "forward"]
        assert head[0]["ms_by_rank"] == {"0": 6.0, "1": 6.0}
    finally:
        for r in ranks:
            r.close()


@pytest.mark.parametrize(
    "path, status, message",
    [
        ("/api/v1/jobs/nope/steps", 404, "unknown job 'nope'"),
        ("/api/v1/jobs/nope/stragglers", 404, "unknown job"),
        ("/api/v1/jobs/j/steps?last=abc", 400, "last must be an integer"),
        ("/api/v1/jobs/j/steps?last=0", 400, "last must be between 1 and"),
        ("/api/v1/jobs/j/modules?step=999", 404, "no step 999"),
        ("/api/v1/jobs/j/stragglers?state=maybe", 400, "state must be"),
        ("/api/v1/nothing", 404, "Not Found"),
    ],
)
def test_errors_are_json(collector, path, status, message):
    rank = FakeRank(collector.grpc_target, "j", 0, 1)
    try:
        stream_steps([rank], [0])
        got, body = get(collector.url, path)
        assert got == status and message in body["error"]
    finally:
        rank.close()


def test_token_guards_the_api_but_not_health(tmp_path):
    c = CollectorThread(tmp_path / "data", token="tok")
    try:
        assert get(c.url, "/api/v1/jobs") == (401, {"error": "missing or wrong bearer token"})
        assert get(c.url, "/api/v1/jobs", token="bad")[0] == 401
        assert get(c.url, "/metrics")[0] == 401
        assert get(c.url, "/api/v1/jobs", token="tok") == (200, {"jobs": []})
        assert get(c.url, "/healthz")[0] == 200
    finally:
        c.stop()


def test_metrics_health_and_index(collector):
    rank = FakeRank(collector.grpc_target, "j", 0, 1)
    try:
        stream_steps([rank], [0, 1])
        wait_for(lambda: "modtrack_" in get(collector.url, "/metrics")[1], 10, "modtrack series on /metrics")
        status, text = get(collector.url, "/metrics")
        assert status == 200 and 'job="j"' in text
        status, health = get(collector.url, "/healthz")
        assert status == 200 and health["status"] == "ok"
        status, page = get(collector.url, "/")
        assert status == 200 and ("modtrack" in page.lower())
    finally:
        rank.close()
