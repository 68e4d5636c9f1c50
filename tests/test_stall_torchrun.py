"""Hung jobs on real torchrun (gloo, 3 ranks, tests/hang_train.py under the agent): the stall API names
the stuck rank, its module, phase and stack, and who waits; ModtrackJobStalled reaches the webhook and
/api/v1/alerts; a job paused as a whole, a slow but moving rank and a clean run raise nothing. Each test
ends its job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from harness.collector_process import CollectorProcess, env
from harness.torchrun import torchrun_cmd
from harness.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "hang_train.py")
RANKS = 3
# Small thresholds so the tests are quick; the defaults (5 s, 3 s) keep the verdict within 20 s.
AGENT_ENV = {"MODTRACK_STALL_MIN_S": "2", "MODTRACK_STALL_REPEAT_S": "1", "OMP_NUM_THREADS": "1"}
VERDICT_WITHIN_S = 20  # from the hang to the API's verdict, for a median step <= 1 s


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def webhook():
    with WebhookReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def collector(tmp_path_factory, webhook):
    data = tmp_path_factory.mktemp("stall")
    c = CollectorProcess(data / "data", "--alert-webhook", webhook.url, log_path=data / "collector.log")
    c.api = f"http://{c.http_addr}"
    try:
        yield c
    finally:
        c.terminate()


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


class Job:
    """torchrun in its own process group; end() takes its ranks down too (torchrun gives each its own)."""

    def __init__(self, collector, job: str, *args: str, agent_env: dict | None = None):
        self.job = job
        self.url = f"{collector.api}/api/v1/jobs/{job}/stall"
        cmd = torchrun_cmd(
            RANKS,
            "-m",
            "modtrack.agent",
            "--collector",
            collector.grpc_target,
            "--job",
            job,
            SCRIPT,
            *args,
        )
        self.proc = subprocess.Popen(
            cmd,
            env=env(**(AGENT_ENV if agent_env is None else agent_env)),
            cwd=REPO,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def end(self) -> str:
        ranks = _children(self.proc.pid)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.communicate(timeout=30)[0]

    def stall(self) -> dict:
        try:
            return get_json(self.url)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # no rank has said hello yet
                return {"stalled": False, "paused": None, "ranks": []}
            raise

    def watch_to_the_end(self) -> list[dict]:
        """Every stall answer, every 0.3 s, until the job ends by itself; it must end well."""
        seen = []
        while self.proc.poll() is None:
            seen.append(self.stall())
            time.sleep(0.3)
        out = self.proc.communicate()[0]
        assert self.proc.returncode == 0 and "done" in out, out[-3000:]
        return seen

    def wait_for(self, condition, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            answer = self.stall()
            if condition(answer):
                return answer
            assert self.proc.poll() is None, f"the job ended: {self.proc.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, json.dumps(answer, indent=1)
            time.sleep(0.25)


def hung(collector, job: str, *args: str) -> dict:
    """Start a job that hangs; return the first stalled verdict."""
    j = Job(collector, job, *args)
    try:
        answer = j.wait_for(lambda a: a["stalled"], 180)
        assert 0 < answer["since_s"] <= VERDICT_WITHIN_S, answer["since_s"]  # the stuck rank's time in place
        return answer
    finally:
        j.end()


def seconds_since_the_hang(mark, seen_at: float) -> float:
    """From the wall time the hung rank wrote as its hang began (hang_train.py --mark) to `seen_at`."""
    assert mark.exists(), "the hung rank never wrote when its hang began"
    return seen_at - float(mark.read_text())


def states(answer: dict) -> dict[int, str]:
    return {r["rank"]: r["state"] for r in answer["ranks"]}


def stalled_alerts(collector, job: str) -> list[dict]:
    alerts = get_json(f"{collector.api}/api/v1/alerts")["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == "ModtrackJobStalled" and a["labels"]["job"] == job]


def webhook_alerts(webhook, job: str, status: str) -> list[dict]:
    return [
        a
        for _, body in webhook.received
        for a in body["alerts"]
        if a["labels"]["alertname"] == "ModtrackJobStalled" and a["labels"]["job"] == job and a["status"] == status
    ]


def test_rank_hung_in_a_modules_forward(collector, webhook, tmp_path):
    """With the agent's default thresholds: the verdict within 20 s of the hang (a step of well under 1 s)."""
    mark = tmp_path / "hang-began"
    j = Job(
        collector,
        "hang-fwd",
        "--hang-rank",
        "1",
        "--hang-in",
        "forward",
        "--hang-module",
        "blocks.1.mlp",
        "--mark",
        str(mark),
        agent_env={"OMP_NUM_THREADS": "1"},
    )
    try:
        answer = j.wait_for(lambda a: a["stalled"], 180)
        late_s = seconds_since_the_hang(mark, time.time())
        print(f"hang-fwd: the verdict came {late_s:.1f} s after the hang")
        assert 0 < late_s <= VERDICT_WITHIN_S, f"the verdict came {late_s:.1f} s after the hang"
        assert states(answer) == {0: "waiting", 1: "stuck", 2: "waiting"}, json.dumps(answer, indent=1)
        stuck = answer["ranks"][1]
        assert (stuck["phase"], stuck["module"], answer["step"]) == ("forward", "TinyGPT.blocks.1.mlp", 10), stuck
        assert any("in hang_forever" in line for line in stuck["stack"][-2:]), stuck["stack"]
        assert any("in forward" in line and "hang_train.py" in line for line in stuck["stack"]), stuck["stack"]
        for waiting in (answer["ranks"][0], answer["ranks"][2]):  # in DDP's gradient all-reduce, after backward
            assert (waiting["phase"], waiting["module"]) == ("backward", None), waiting
        # the verdict came soon after the hang: the stuck rank's time in place is that of the stall
        assert 0 < answer["since_s"] <= VERDICT_WITHIN_S, answer["since_s"]
        labels = {"job": "hang-fwd", "rank": "1", "module": "TinyGPT.blocks.1.mlp", "phase": "forward"}
        alert = j_alert = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (alert and j_alert):
            alert = next(iter(stalled_alerts(collector, "hang-fwd")), None)
            j_alert = next(iter(webhook_alerts(webhook, "hang-fwd", "firing")), None)
            time.sleep(0.2)
        for a in (alert, j_alert):
            assert a is not None and {k: a["labels"][k] for k in labels} == labels, a
            assert a["labels"]["host"] == stuck["host"] and a["status"] == "firing", a
            assert "hang_forever" in a["annotations"]["description"], a
        metrics = urllib.request.urlopen(f"{collector.api}/metrics", timeout=5).read().decode()
        assert 'modtrack_job_stalled_seconds{host="' in metrics and 'job="hang-fwd"' in metrics
    finally:
        j.end()
    # killed: the streams closed, the stall is over and its alert resolves
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (j.stall()["stalled"] or stalled_alerts(collector, "hang-fwd")):
        time.sleep(0.3)
    assert not j.stall()["stalled"] and not stalled_alerts(collector, "hang-fwd")
    webhook.wait_for(lambda bodies: webhook_alerts(webhook, "hang-fwd", "resolved"), 10)
    assert webhook_alerts(webhook, "hang-fwd", "resolved")


def test_rank_hung_in_data_loading_outside_every_module(collector):
    answer = hung(collector, "hang-data", "--hang-rank", "2", "--hang-in", "data")
    assert states(answer) == {0: "waiting", 1: "waiting", 2: "stuck"}, json.dumps(answer, indent=1)
    stuck = answer["ranks"][2]
    assert (stuck["phase"], stuck["module"], answer["step"]) == ("data", None, 10), stuck
    assert any("in next_batch" in line for line in stuck["stack"]), stuck["stack"]


def test_rank_hung_in_backward(collector):
    answer = hung(collector, "hang-bwd", "--hang-rank", "0", "--hang-in", "backward", "--hang-module", "blocks.0.attn")
    assert states(answer) == {0: "stuck", 1: "waiting", 2: "waiting"}, json.dumps(answer, indent=1)
    stuck = answer["ranks"][0]
    assert (stuck["phase"], stuck["module"], answer["step"]) == ("backward", "TinyGPT.blocks.0.attn", 10), stuck
    assert any("in backward" in line and "hang_train.py" in line for line in stuck["stack"]), stuck["stack"]


SLOW_STEP, PAUSE_STEP = 5, 12


@pytest.fixture(scope="module")
def slow_then_paused(collector) -> tuple[str, list[dict]]:
    """The job the two "never stalled" tests watch, to its end: rank 1 runs a module's forward over and over
    for 7 s in step 5 (a recurrent loop: slow, but moving) while the others wait for it in the gradient
    all-reduce; every rank pauses 7 s after step 12's optimizer step (a checkpoint); 20 steps in all. Every
    stall answer, every 0.3 s."""
    j = Job(collector, "slow-then-paused", "--hang-rank", "1", "--hang-in", "slow,pause", "--pause-s", "7",
            "--hang-step", str(SLOW_STEP), "--pause-step", str(PAUSE_STEP), "--steps", "20")  # fmt: skip
    try:
        return j.job, j.watch_to_the_end()
    finally:
        j.end()


def test_all_ranks_pausing_together_is_a_pause_not_a_stall(collector, webhook, slow_then_paused):
    job, seen = slow_then_paused
    paused = [a for a in seen if a["paused"] is not None]
    assert paused, "no look saw the pause"
    for answer in paused:  # the checkpoint, and only it: never the slow rank's step
        assert set(states(answer).values()) == {"running"}, json.dumps(answer, indent=1)
        assert (answer["paused"]["phase"], answer["paused"]["step"]) == ("data", PAUSE_STEP + 1), answer["paused"]
        assert any("in save_checkpoint" in line for line in answer["paused"]["stack"]), answer["paused"]
    assert not any(a["stalled"] for a in seen), next(a for a in seen if a["stalled"])  # to the end of the job
    assert not stalled_alerts(collector, job) and not webhook_alerts(webhook, job, "firing")


def test_slow_steps_get_the_verdict_within_three_median_steps_and_10_s(collector, tmp_path):
    """Steps of over 2 s (a slow data loader), the agent's default thresholds: the heartbeat waits for
    3 median steps (6 s, over the 5 s minimum), and the verdict comes within 3 median steps + 10 s of the hang."""
    step_s, mark = 2.0, tmp_path / "hang-began"
    j = Job(
        collector,
        "hang-slow-steps",
        *("--step-s", str(step_s), "--hang-step", "3", "--hang-rank", "2", "--hang-in", "forward"),
        *("--hang-module", "blocks.0.attn", "--mark", str(mark)),
        agent_env={"OMP_NUM_THREADS": "1"},
    )
    try:
        answer = j.wait_for(lambda a: a["stalled"], 180)
        late_s = seconds_since_the_hang(mark, time.time())
        print(f"hang-slow-steps: the verdict came {late_s:.1f} s after the hang")
        assert 0 < late_s <= 3 * step_s + 10, f"the verdict came {late_s:.1f} s after the hang"  # median >= step_s
        assert states(answer) == {0: "waiting", 1: "waiting", 2: "stuck"}, json.dumps(answer, indent=1)
        assert (answer["ranks"][2]["module"], answer["step"]) == ("TinyGPT.blocks.0.attn", 3), answer["ranks"][2]
    finally:
        j.end()


def test_a_slow_but_moving_rank_and_a_clean_run_are_never_stalled(collector, webhook, slow_then_paused):
    """In step 5 every rank is in a long step (from ~3 s on) and none is stuck; the job's other steps and its
    end are a clean run's; the job ends normally. Never stalled, and paused only at its checkpoint (above)."""
    job, seen = slow_then_paused
    before_pause = seen[: next((i for i, a in enumerate(seen) if a["paused"]), len(seen))]
    every_rank_long = [
        a
        for a in before_pause
        if len(a["ranks"]) == RANKS and all(r["phase"] and r["step"] == SLOW_STEP for r in a["ranks"])
    ]
    assert every_rank_long, "no look saw every rank in the slow step: the test proved nothing"
    assert not any(a["stalled"] for a in seen), next(a for a in seen if a["stalled"])
    assert all(a["paused"]["step"] == PAUSE_STEP + 1 for a in seen if a["paused"])
    assert not stalled_alerts(collector, job) and not webhook_alerts(webhook, job, "firing")
