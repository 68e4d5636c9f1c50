"""The whole path on real processes: a collector subprocess, torchrun with CPU ranks (gloo),
examples/train.py under `-m modtrack.agent`, and the verdict read back over the HTTP API."""
from __future__ import annotations

import json
import os
import signal
import statistics
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "examples", "train.py")
STEPS = 30
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1"}
ENV.pop("MODTRACK_COLLECTOR", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


class Collector:
    def __init__(self, data_dir):
        self.grpc_addr = f"127.0.0.1:{free_port()}"
        self.api = f"http://127.0.0.1:{free_port()}"
        self.log = open(os.path.join(data_dir, "collector.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modtrack.collector", "serve", "--grpc-addr", self.grpc_addr,
             "--http-addr", self.api.removeprefix("http://"), "--data-dir", str(data_dir)],
            env=ENV, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, "collector exited"
            try:
                get_json(f"{self.api}/api/v1/jobs")
                return
            except OSError:
                assert time.monotonic() < deadline, "collector not serving"
                time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def verdict(self, job: str, last_step: int, timeout_s: float = 30) -> list[dict]:
        """Stragglers once the collector evaluated the job's last step."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            jobs = {j["job"]: j for j in get_json(f"{self.api}/api/v1/jobs")["jobs"]}
            if jobs.get(job, {}).get("last_evaluated_step", -1) >= last_step:
                break
            time.sleep(0.3)
        return get_json(f"{self.api}/api/v1/jobs/{job}/stragglers")["stragglers"]


def post_json(url: str):
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def last_step(collector: Collector, job: str) -> int:
    jobs = {j["job"]: j for j in get_json(f"{collector.api}/api/v1/jobs")["jobs"]}
    return jobs.get(job, {}).get("last_step") or -1


@pytest.fixture
def collector(tmp_path):
    c = Collector(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def torchrun_cmd(ranks: int, agent_args: list[str], train_args: list[str], steps: int = STEPS) -> list[str]:
    launch = ["-m", "modtrack.agent", *agent_args] if agent_args else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            *launch, TRAIN, "--steps", str(steps), "--log-every", "5", *train_args]


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """In its own process group, so that ending it ends torchrun's ranks too."""
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, text=True, start_new_session=True, **kw)


def end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def torchrun(ranks: int, agent_args: list[str], train_args: list[str], timeout=300) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(ranks, agent_args, train_args)
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        end(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def training_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith(("step ", "done"))]


@pytest.fixture(scope="module")
def plain_run():
    """The same training without the agent: what every tracked run must print too."""
    out = torchrun(3, [], [])
    assert out.returncode == 0, out.stderr[-3000:]
    return training_lines(out)


def test_clean_run_has_no_straggler_and_no_alert(collector, plain_run):
    out = torchrun(3, ["--collector", collector.grpc_addr, "--job", "clean"], [])
    assert out.returncode == 0, out.stderr[-3000:]
    assert training_lines(out) == plain_run
    assert "modtrack:" not in out.stderr
    stragglers = collector.verdict("clean", STEPS - 1)
    assert stragglers == [], json.dumps(stragglers, indent=1)
    assert get_json(f"{collector.api}/api/v1/alerts")["alerts"] == []
    steps = get_json(f"{collector.api}/api/v1/jobs/clean/steps?last=5")["steps"]
    assert [len(s["ranks"]) for s in steps] == [3] * 5


def test_rank_slowed_in_forward_is_named_with_module_and_phase(collector):
    onset = 8
    out = torchrun(3, ["--collector", collector.grpc_addr, "--job", "fwd"],
                   ["--slow-rank", "1", "--slow-module", "blocks.2.attn", "--slow-phase", "forward",
                    "--slow-ms", "60", "--slow-from-step", str(onset)])
    assert out.returncode == 0, out.stderr[-3000:]
    stragglers = collector.verdict("fwd", STEPS - 1)
    culprit = [s for s in stragglers if (s["rank"], s["module"], s["phase"]) == (1, "TinyGPT.blocks.2.attn", "forward")]
    assert culprit, json.dumps(stragglers, indent=1)
    first = min(culprit, key=lambda s: s["first_step"])
    assert onset <= first["first_step"] <= onset + 5, json.dumps(culprit, indent=1)
    assert first["slowdown"] > 2 and first["cost_ms_per_step"] > 10, first  # 60 ms injected, CPUs shared
    assert [s for s in stragglers if s["rank"] != 1] == [], json.dumps(stragglers, indent=1)


def test_rank_slowed_in_backward_under_ddp_is_the_only_one_named(collector):
    """The gradient all-reduce makes every rank's backward as long as the slow one's."""
    onset = 8
    out = torchrun(3, ["--collector", collector.grpc_addr, "--job", "bwd"],
                   ["--slow-rank", "2", "--slow-module", "blocks.1.mlp", "--slow-phase", "backward",
                    "--slow-ms", "60", "--slow-from-step", str(onset)])
    assert out.returncode == 0, out.stderr[-3000:]
    stragglers = collector.verdict("bwd", STEPS - 1)
    culprit = [s for s in stragglers if (s["rank"], s["module"], s["phase"]) == (2, "TinyGPT.blocks.1.mlp", "backward")]
    assert culprit, json.dumps(stragglers, indent=1)
    first = min(culprit, key=lambda s: s["first_step"])
    assert onset <= first["first_step"] <= onset + 5, json.dumps(culprit, indent=1)
    assert [s for s in stragglers if s["rank"] != 2] == [], json.dumps(stragglers, indent=1)  # no victim
    steps = get_json(f"{collector.api}/api/v1/jobs/bwd/steps?last=10")["steps"]
    waits = {rank: statistics.median(r["sync_wait_ms"] for s in steps for r in s["ranks"] if r["rank"] == rank)
             for rank in range(3)}
    assert waits[2] < min(waits[0], waits[1]), waits  # the others wait for rank 2


def test_collector_never_started(tmp_path, plain_run):
    out = torchrun(3, ["--collector", f"127.0.0.1:{free_port()}", "--job", "nobody"], [])
    assert out.returncode == 0, out.stderr[-3000:]
    assert training_lines(out) == plain_run
    assert out.stderr.count("modtrack:") <= 3  # at most one line per rank


def test_collector_killed_mid_run(tmp_path, plain_run):
    c = Collector(tmp_path)
    try:
        cmd = torchrun_cmd(3, ["--collector", c.grpc_addr, "--job", "killed"], [])
        proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None and last_step(c, "killed") < 5:
                time.sleep(0.2)
            assert proc.poll() is None, "training ended before the collector could be killed"
            c.stop(signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            end(proc)
    finally:
        c.stop()
    assert proc.returncode == 0, stderr[-3000:]
    assert training_lines(subprocess.CompletedProcess(cmd, 0, stdout, stderr)) == plain_run


def test_capture_pause_and_resume_reach_the_ranks(collector):
    """Controls travel back up the stream: a trace capture, and a pause that loses no step."""
    steps = 80
    cmd = torchrun_cmd(2, ["--collector", collector.grpc_addr, "--job", "ctl"], ["--batch", "4"], steps=steps)
    proc = start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while last_step(collector, "ctl") < 5:
            assert proc.poll() is None and time.monotonic() < deadline, "training did not report"
            time.sleep(0.1)
        captured = post_json(f"{collector.api}/api/v1/jobs/ctl/capture?steps=3")
        assert captured["ranks"] == 2
        paused = post_json(f"{collector.api}/api/v1/jobs/ctl/pause")
        assert paused["ranks"] == 2
        time.sleep(0.5)  # reports already on the wire still land
        frozen = last_step(collector, "ctl")
        time.sleep(2)
        assert last_step(collector, "ctl") == frozen  # nothing sent while paused
        assert proc.poll() is None, "training ended during the pause; make it longer"
        post_json(f"{collector.api}/api/v1/jobs/ctl/resume")
        _, stderr = proc.communicate(timeout=300)
    finally:
        end(proc)
    assert proc.returncode == 0, stderr[-3000:]
    collector.verdict("ctl", steps - 1)
    stored = get_json(f"{collector.api}/api/v1/jobs/ctl/steps?last={steps}")["steps"]
    assert [s["step"] for s in stored] == list(range(steps))  # the pause lost nothing
    assert all(len(s["ranks"]) == 2 for s in stored)
    trace = get_json(f"{collector.api}/api/v1/jobs/ctl/trace?from_step=0&to_step={steps - 1}")
    assert trace["otherData"]["source"] == "capture"
    assert len({e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"}) == 2  # one process per rank
