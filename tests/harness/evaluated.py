"""Waiting for the collector's verdict: until it has evaluated (and stored the verdict on) a step."""

from __future__ import annotations

from harness.http import get
from harness.waiting import wait_for


def wait_evaluated(url: str, step: int, job: str = "train", timeout: float = 10.0) -> None:
    """Until the collector at `url` has evaluated `step` of `job`; fails at the deadline."""

    def done():
        jobs = {j["job"]: j for j in get(url, "/api/v1/jobs")[1]["jobs"]}
        return job in jobs and (jobs[job]["last_evaluated_step"] or -1) >= step

    wait_for(done, timeout, lambda: f"the evaluation of step {step} of {job}: {get(url, '/api/v1/jobs')[1]}",
             interval=0.1, retry_on=(OSError,))  # fmt: skip


def wait_stall_with_every_beat(url: str, job: str, timeout: float = 10.0) -> tuple[int, dict]:
    """GET /api/v1/jobs/{job}/stall once it says stalled with a heartbeat from every rank. Until one
    rank's hello and heartbeat are in, the others can already look stalled (that rank missing)."""

    def answer():
        status, body = get(url, f"/api/v1/jobs/{job}/stall")
        return body.get("stalled") and all(r["seconds"] is not None for r in body["ranks"]) and (status, body)

    return wait_for(answer, timeout, lambda: f"a stall of {job} with every rank's heartbeat", interval=0.05)
