"""`collector serve --detect-*`: the detector settings reach every job's detector."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.collector_process import CollectorProcess
from harness.collector_thread import CollectorThread
from harness.fake_rank import MODULES, FakeRank, report
from harness.http import get
from harness.waiting import wait_for
from modtrack.collector.pipeline.detector import DetectorParams
from modtrack.protos import modtrack_pb2 as pb

BASE = [1.0, 2.0, 3.0, 4.0, 5.0]  # ms per module (Net, embed, blocks.0, blocks.1, head)


def one_step_with_two_slow_ranks(
    target: str, url: str, job: str = "job", slow=None, clock=pb.CLOCK_KIND_CPU
) -> list[dict]:
    """Rank 1 is 2 ms over its peers in Net.embed, rank 2 is 8 ms over in Net.blocks.1; step 0 only. The step is
    synchronous: each rank waits in the backward tail until the slowest is done."""
    slow = slow or {1: (1, 2.0), 2: (3, 8.0)}
    slowest = max(extra for _, extra in slow.values())
    ranks = [FakeRank(target, job, r, 4, hello=False) for r in range(4)]
    for r, rank in enumerate(ranks):
        rank.send(
            pb.AgentMessage(
                hello=pb.Hello(
                    protocol_version=1,
                    job=job,
                    rank=r,
                    world_size=4,
                    host=f"host{r}",
                    pid=1000 + r,
                    module_names=MODULES,
                    session="s",
                    clock_kind=clock,
                )
            )
        )
    try:
        for r, rank in enumerate(ranks):
            ms = list(BASE)
            extra = slow[r][1] if r in slow else 0.0
            if r in slow:
                ms[slow[r][0]] += extra
            rank.report(report(0, ms, sync_ms=1.0 + slowest - extra))
        for rank in ranks:
            rank.wait_ack(0)
        wait_for(
            lambda: {j["job"]: j for j in get(url, "/api/v1/jobs")[1]["jobs"]}[job].get("last_evaluated_step") == 0,
            what="the evaluation of step 0",
        )
        return get(url, f"/api/v1/jobs/{job}/stragglers")[1]["stragglers"]
    finally:
        for rank in ranks:
            rank.close()


def test_defaults_wait_for_k_steps(tmp_path):
    c = CollectorThread(tmp_path / "data")
    try:
        assert one_step_with_two_slow_ranks(c.grpc_target, c.url) == []  # k = 3: one step is not enough
    finally:
        c.stop()


@pytest.mark.slow
def test_detect_k_and_the_excess_floor_reach_the_detector(tmp_path):
    server = CollectorProcess(
        tmp_path / "data", "--detect-k", "1", "--detect-min-excess-ms", "3", "--detect-warmup-steps", "0"
    )
    try:
        stragglers = one_step_with_two_slow_ranks(server.grpc_target, server.url)
        # k = 1: the first flagged step opens an episode; rank 1's 2 ms are under the 3 ms floor
        assert [(s["rank"], s["module"], s["first_step"]) for s in stragglers] == [(2, "Net.blocks.1", 0)]
        assert server.terminate() == 0
    finally:
        server.kill()


def test_k_above_n_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "modtrack.collector",
            "serve",
            "--data-dir",
            str(tmp_path),
            "--detect-k",
            "6",
            "--detect-n",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--detect-k" in out.stderr


def test_cpu_clocked_jobs_get_a_floor_cuda_jobs_do_not(tmp_path):
    """Rank 1 is 1.3x in a 1 ms module (0.3 ms over): CPU time varies that much between processes,
    GPU events do not."""
    c = CollectorThread(tmp_path / "data", detector=DetectorParams(k=1, warmup_steps=0))
    try:
        small = {1: (0, 0.3)}
        assert one_step_with_two_slow_ranks(c.grpc_target, c.url, "on-cpu", small) == []
        found = one_step_with_two_slow_ranks(c.grpc_target, c.url, "on-gpu", small, pb.CLOCK_KIND_CUDA)
        assert [(s["rank"], s["module"]) for s in found] == [(1, "Net")]
        big = one_step_with_two_slow_ranks(c.grpc_target, c.url, "big-on-cpu")  # 2 ms and 8 ms over
        assert sorted((s["rank"], s["module"]) for s in big) == [(1, "Net.embed"), (2, "Net.blocks.1")]
    finally:
        c.stop()


def test_a_cpu_clocked_jobs_first_steps_judge_nothing(tmp_path):
    """The same 2 ms and 8 ms excess in a CPU job's first step opens nothing by default (its warm-up)."""
    c = CollectorThread(tmp_path / "data", detector=DetectorParams(k=1))
    try:
        assert one_step_with_two_slow_ranks(c.grpc_target, c.url, "big-on-cpu") == []
    finally:
        c.stop()
