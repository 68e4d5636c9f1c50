"""The whole path on real processes: a collector subprocess, torchrun with CPU ranks (gloo),
examples/train.py under `-m modtrack.agent`, and the verdict read back over the HTTP API."""

from __future__ import annotations

import json
import statistics
import subprocess
import time

import pytest

from harness import torchrun as launch
from harness.collector_process import CollectorProcess
from harness.evaluated import wait_evaluated
from harness.http import post_json
from harness.ports import free_port
from harness.torchrun import TRAIN, end, start
from harness.waiting import wait_for

pytestmark = pytest.mark.slow

# The scenario benchmark's model and length (tests/bench/scenarios.py MODEL, STEPS): a step of ~40 ms, not
# the example's default ~170 ms, on 3 ranks sharing 2 cores. The clean run is the benchmark's clean case.
MODEL = ["--dim", "64", "--batch", "8", "--context", "32", "--layers", "4", "--heads", "4", "--vocab", "256"]
STEPS = 45


def verdict(collector: CollectorProcess, job: str, last_step: int, timeout_s: float = 30) -> list[dict]:
    """The job's stragglers once the collector evaluated its last step; fails if it never does."""
    wait_evaluated(collector.url, last_step, job, timeout_s)
    return collector.get(f"/api/v1/jobs/{job}/stragglers")["stragglers"]


def last_step(collector: CollectorProcess, job: str) -> int:
    jobs = {j["job"]: j for j in collector.get("/api/v1/jobs")["jobs"]}
    return jobs.get(job, {}).get("last_step") or -1


@pytest.fixture
def collector(tmp_path):
    with CollectorProcess(tmp_path / "data") as c:
        yield c


def torchrun_cmd(
    ranks: int, agent_args: list[str], train_args: list[str], steps: int = STEPS, model: list[str] = MODEL
) -> list[str]:
    agent = ["-m", "modtrack.agent", *agent_args] if agent_args else []
    return launch.torchrun_cmd(ranks, *agent, TRAIN, "--steps", str(steps), "--log-every", "5", *model, *train_args)


def torchrun(
    ranks: int, agent_args: list[str], train_args: list[str], steps: int = STEPS, timeout=300
) -> subprocess.CompletedProcess:
    return launch.run(torchrun_cmd(ranks, agent_args, train_args, steps), timeout)


SLOWED_STEPS = 30  # a straggler from step 8: named within 5 steps, its last 10 steps slow


def training_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith(("step ", "done"))]


@pytest.fixture(scope="module")
def plain_and_unreachable() -> tuple[list[str], subprocess.CompletedProcess]:
    """The same training without the agent (what every tracked run must print too), and under the agent with a
    collector that never started: side by side, as neither is timed."""
    plain, unreachable = launch.run_all(
        [torchrun_cmd(3, [], []), torchrun_cmd(3, ["--collector", f"127.0.0.1:{free_port()}", "--job", "nobody"], [])]
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    return training_lines(plain), unreachable


@pytest.fixture(scope="module")
def plain_run(plain_and_unreachable) -> list[str]:
    return plain_and_unreachable[0]


def test_clean_run_has_no_straggler_and_no_alert(collector, plain_run):
    """Also the scenario benchmark's clean case (ddp, 3 ranks, its model and length): no false alarm."""
    out = torchrun(3, ["--collector", collector.grpc_target, "--job", "clean"], [])
    assert out.returncode == 0, out.stderr[-3000:]
    assert training_lines(out) == plain_run
    assert "modtrack:" not in out.stderr
    stragglers = verdict(collector, "clean", STEPS - 1)
    assert stragglers == [], json.dumps(stragglers, indent=1)
    assert collector.get("/api/v1/alerts")["alerts"] == []
    steps = collector.get("/api/v1/jobs/clean/steps?last=5")["steps"]
    assert [len(s["ranks"]) for s in steps] == [3] * 5


def test_rank_slowed_in_forward_is_named_with_module_and_phase(collector):
    onset = 8
    out = torchrun(
        3,
        ["--collector", collector.grpc_target, "--job", "fwd"],
        [
            "--slow-rank",
            "1",
            "--slow-module",
            "blocks.2.attn",
            "--slow-phase",
            "forward",
            "--slow-ms",
            "60",
            "--slow-from-step",
            str(onset),
        ],
        SLOWED_STEPS,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    stragglers = verdict(collector, "fwd", SLOWED_STEPS - 1)
    culprit = [s for s in stragglers if (s["rank"], s["module"], s["phase"]) == (1, "TinyGPT.blocks.2.attn", "forward")]
    assert culprit, json.dumps(stragglers, indent=1)
    first = min(culprit, key=lambda s: s["first_step"])
    assert onset <= first["first_step"] <= onset + 5, json.dumps(culprit, indent=1)
    assert first["slowdown"] > 2 and first["cost_ms_per_step"] > 10, first  # 60 ms injected, CPUs shared
    assert [s for s in stragglers if s["rank"] != 1] == [], json.dumps(stragglers, indent=1)


def test_rank_slowed_in_backward_under_ddp_is_the_only_one_named(collector):
    """The gradient all-reduce makes every rank's backward as long as the slow one's."""
    onset = 8
    out = torchrun(
        3,
        ["--collector", collector.grpc_target, "--job", "bwd"],
        [
            "--slow-rank",
            "2",
            "--slow-module",
            "blocks.1.mlp",
            "--slow-phase",
            "backward",
            "--slow-ms",
            "60",
            "--slow-from-step",
            str(onset),
        ],
        SLOWED_STEPS,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    stragglers = verdict(collector, "bwd", SLOWED_STEPS - 1)
    culprit = [s for s in stragglers if (s["rank"], s["module"], s["phase"]) == (2, "TinyGPT.blocks.1.mlp", "backward")]
    assert culprit, json.dumps(stragglers, indent=1)
    first = min(culprit, key=lambda s: s["first_step"])
    assert onset <= first["first_step"] <= onset + 5, json.dumps(culprit, indent=1)
    assert [s for s in stragglers if s["rank"] != 2] == [], json.dumps(stragglers, indent=1)  # no victim
    steps = collector.get("/api/v1/jobs/bwd/steps?last=10")["steps"]
    waits = {
        rank: statistics.median(r["sync_wait_ms"] for s in steps for r in s["ranks"] if r["rank"] == rank)
        for rank in range(3)
    }
    assert waits[2] < min(waits[0], waits[1]), waits  # the others wait for rank 2


def test_collector_never_started(plain_and_unreachable):
    plain, out = plain_and_unreachable
    assert out.returncode == 0, out.stderr[-3000:]
    assert training_lines(out) == plain
    assert out.stderr.count("modtrack:") <= 3  # at most one line per rank


def test_collector_killed_mid_run(tmp_path, plain_run):
    c = CollectorProcess(tmp_path / "data")
    try:
        # a slow data loader on rank 1 (same losses printed): 40 steps of ~0.1 s left once step 5 is in
        slow_loader = ["--slow-rank", "1", "--slow-phase", "data", "--slow-ms", "60"]
        cmd = torchrun_cmd(3, ["--collector", c.grpc_target, "--job", "killed"], slow_loader)
        proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(
                lambda: proc.poll() is not None or last_step(c, "killed") >= 5,
                120,
                "step 5 at the collector",
                interval=0.2,
            )
            assert proc.poll() is None, "training ended before the collector could be killed"
            c.kill()
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            end(proc)
    finally:
        c.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert training_lines(subprocess.CompletedProcess(cmd, 0, stdout, stderr)) == plain_run


def test_capture_pause_and_resume_reach_the_ranks(collector):
    """Controls travel back up the stream: a trace capture, and a pause that loses no step."""
    steps = 80
    cmd = torchrun_cmd(2, ["--collector", collector.grpc_target, "--job", "ctl"], ["--batch", "4"], steps, model=[])
    proc = start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:

        def reported_5_steps() -> bool:
            assert proc.poll() is None, "training ended before it reported 5 steps"
            return last_step(collector, "ctl") >= 5

        wait_for(reported_5_steps, 120, "training to report 5 steps", interval=0.1)
        captured = post_json(f"{collector.url}/api/v1/jobs/ctl/capture?steps=3")
        assert captured["ranks"] == 2
        paused = post_json(f"{collector.url}/api/v1/jobs/ctl/pause")
        assert paused["ranks"] == 2
        # Not waits for a condition: windows in which a rank that ignored the pause would go on reporting.
        time.sleep(0.5)  # reports already on the wire still land
        frozen = last_step(collector, "ctl")
        time.sleep(2)
        assert last_step(collector, "ctl") == frozen  # nothing sent while paused
        assert proc.poll() is None, "training ended during the pause; make it longer"
        post_json(f"{collector.url}/api/v1/jobs/ctl/resume")
        _, stderr = proc.communicate(timeout=300)
    finally:
        end(proc)
    assert proc.returncode == 0, stderr[-3000:]
    verdict(collector, "ctl", steps - 1)
    stored = collector.get(f"/api/v1/jobs/ctl/steps?last={steps}")["steps"]
    assert [s["step"] for s in stored] == list(range(steps))  # the pause lost nothing
    assert all(len(s["ranks"]) == 2 for s in stored)
    trace = collector.get(f"/api/v1/jobs/ctl/trace?from_step=0&to_step={steps - 1}")
    assert trace["otherData"]["source"] == "capture"
    assert len({e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"}) == 2  # one process per rank
