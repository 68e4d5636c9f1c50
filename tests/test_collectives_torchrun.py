"""Collective timing on real torchrun (gloo, 2 ranks, DDP) through the agent and a real collector over gRPC:
the rank that sleeps a known time before each step arrives last at the gradient all-reduce, and its peer's
wait there, as the collector computes it from the Flight Recorder's issue times, is that sleep."""

from __future__ import annotations

import os
import sys

from harness.collector_process import REPO
from harness.http import get
from harness.torchrun import run, torchrun_cmd
from harness.waiting import wait_for

SCRIPT = os.path.join(REPO, "tests", "collectives_train.py")
LATE_MS = 40.0


def test_the_late_rank_arrives_last_and_its_peer_waits_the_injected_time(collector):
    job = "collectives-ddp"
    cmd = torchrun_cmd(2, "-m", "modtrack.agent", "--collector", collector.grpc_target, "--job", job, SCRIPT)
    cmd += ["--late-rank", "1", "--late-ms", str(LATE_MS), "--steps", "30"]
    done = run(cmd, timeout=180, extra_env={"MODTRACK_COLLECTIVES": "on"})
    assert done.returncode == 0, done.stderr[-3000:]

    def world_group():
        status, body = get(collector.url, f"/api/v1/jobs/{job}/collectives?last=20")
        groups = [g for g in body.get("groups", []) if g["size"] == 2] if status == 200 else []
        return groups[0] if groups and groups[0]["steps"] >= 15 else None

    group = wait_for(world_group, timeout=30, what="20 complete steps of the world group's collectives")
    print(group, file=sys.stderr)
    assert group["backend"] == "gloo" and not group["active_measured"] and group["transfer_ms"] is None
    assert group["late_rank"] == 1
    ranks = {r["rank"]: r for r in group["ranks"]}
    assert ranks[1]["last_share"] >= 0.9
    # the truth: rank 1 slept LATE_MS before each step; rank 0 waited for it at the step's all-reduce(s)
    assert 0.8 * LATE_MS <= ranks[0]["wait_ms"] <= 1.3 * LATE_MS, ranks
    assert ranks[1]["wait_ms"] <= 0.1 * LATE_MS, ranks
    # one DDP bucket a step: Linear(64, 64) + Linear(64, 1) in float32
    assert group["bytes_per_step"] == 4 * (64 * 64 + 64 + 64 + 1)
