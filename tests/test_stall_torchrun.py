"""Hung jobs on real torchrun (gloo, 3 ranks, tests/hang_train.py under the agent): the stall API names
the stuck rank, its module, phase and stack, and who waits; ModtrackJobStalled reaches the webhook and
/api/v1/alerts; a job paused as a whole, and a clean run, raise nothing. Each test ends its job."""

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


def test_all_ranks_pausing_together_is_a_pause_not_a_stall(collector, webhook):
    j = Job(collector, "pause", "--hang-in", "pause", "--pause-s", "10", "--steps", "20")
    try:
        answer = j.wait_for(lambda a: a["paused"] is not None or a["stalled"], 180)
        assert not answer["stalled"], json.dumps(answer, indent=1)
        assert set(states(answer).values()) == {"running"}, json.dumps(answer, indent=1)
        assert (answer["paused"]["phase"], answer["paused"]["step"]) == ("data", 11), answer["paused"]
        assert any("in save_checkpoint" in line for line in answer["paused"]["stack"]), answer["paused"]
        while j.proc.poll() is None:  # never stalled, to the end of the job
            assert not j.stall()["stalled"]
            time.sleep(0.3)
        out = j.proc.communicate()[0]
        assert j.proc.returncode == 0 and "done" in out, out[-3000:]
    finally:
        j.end()
    assert not stalled_alerts(collector, "pause") and not webhook_alerts(webhook, "pause", "firing")


def test_clean_run_is_never_stalled(collector, webhook):
    j = Job(collector, "clean", "--steps", "40")
    try:
        seen = j.watch_to_the_end()
    finally:
        j.end()
    assert seen and not any(a["stalled"] or a["paused"] for a in seen)
    assert not stalled_alerts(collector, "clean") and not webhook_alerts(webhook, "clean", "firing")


def test_slow_steps_get_the_verdict_within_three_median_steps_and_10_s(collector, tmp_path):
    """Steps of over 2.5 s (a slow data loader), the agent's default thresholds: the heartbeat waits for
    3 median steps, and the verdict comes within 3 median steps + 10 s of the hang."""
    step_s, mark = 2.5, tmp_path / "hang-began"
    j = Job(
        collector,
        "hang-slow-steps",
        *("--step-s", str(step_s), "--hang-step", "4", "--hang-rank", "2", "--hang-in", "forward"),
        *("--hang-module", "blocks.0.attn", "--mark", str(mark)),
        agent_env={"OMP_NUM_THREADS": "1"},
    )
    try:
        answer = j.wait_for(lambda a: a["stalled"], 180)
        late_s = seconds_since_the_hang(mark, time.time())
        print(f"hang-slow-steps: the verdict came {late_s:.1f} s after the hang")
        assert 0 < late_s <= 3 * step_s + 10, f"the verdict came {late_s:.1f} s after the hang"  # median >= step_s
        assert states(answer) == {0: "waiting", 1: "waiting", 2: "stuck"}, json.dumps(answer, indent=1)
        assert (answer["ranks"][2]["module"], answer["step"]) == ("TinyGPT.blocks.0.attn", 4), answer["ranks"][2]
    finally:
        j.end()


def test_a_slow_but_moving_rank_is_never_stalled(collector, webhook):
    """Rank 1 runs a module's forward over and over for 10 s (a recurrent loop) while the others wait for it
    in the gradient all-reduce: every rank is in a long step, none is stuck, and the job ends normally."""
    j = Job(collector, "slow-moving", "--hang-rank", "1", "--hang-in", "slow", "--pause-s", "10", "--steps", "20")
    try:
        seen = j.watch_to_the_end()
    finally:
        j.end()
    every_rank_long = [a for a in seen if len(a["ranks"]) == RANKS and all(r["phase"] for r in a["ranks"])]
    assert every_rank_long, "no look saw every rank in a long step: the test proved nothing"
    assert not any(a["stalled"] or a["paused"] for a in seen), next(a for a in seen if a["stalled"] or a["paused"])
    assert not stalled_alerts(collector, "slow-moving") and not webhook_alerts(webhook, "slow-moving", "firing")
