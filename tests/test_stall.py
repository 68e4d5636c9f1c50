"""Hung jobs in one process: the tracker's position on a real model, the heartbeat of a training thread
blocked in C code, the verdict's rules, and the stall API, CLI and edge checks over real gRPC.
(tests/test_stall_torchrun.py runs the same on real torchrun jobs.)"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import grpc
import torch
from torch import nn

from harness.collector_thread import CollectorThread
from harness.evaluated import wait_stall_with_every_beat
from harness.fake_rank import FakeRank
from harness.http import get
from harness.waiting import wait_for
from modtrack.agent import ModuleTracker
from modtrack.agent import position as at
from modtrack.agent.heartbeat import Heartbeat, HeartbeatSettings, thread_stack
from modtrack.agent.step_record import PHASES
from modtrack.collector.api.stall_text import render_stall
from modtrack.collector.pipeline.stall import Beat, RankView, verdict, waits_in_collective
from modtrack.collector.pipeline.stall_watch import StallWatch
from modtrack.protos import modtrack_pb2 as pb

GLOO_WAIT = "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py:2850 in all_reduce: work.wait()"
DDP_WAIT = (
    "/venv/lib/python3.11/site-packages/torch/autograd/graph.py:829 in _engine_run_backward: "
    "return Variable._execution_engine.run_backward("
)
USER = "/job/train.py:40 in forward: time.sleep(3600)"


class Probe(torch.autograd.Function):
    """Identity; calls `seen` in backward, inside the module that applies it."""

    @staticmethod
    def forward(ctx, x, seen):
        ctx.seen = seen
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.seen("backward")
        return grad, None


class Block(nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.seen = seen

    def forward(self, x):
        self.seen("forward")
        return Probe.apply(self.fc(x), self.seen)


class Net(nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.block = Block(seen)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.block(x)))


def poll_beats(beat, n: int, every_s: float, deadline_s: float = 20) -> list[tuple[float, object]]:
    """Poll the heartbeat as the sender does until it sent `n` beats or `deadline_s` passed: (when, beat)."""
    beats = []
    deadline = time.monotonic() + deadline_s
    while len(beats) < n and time.monotonic() < deadline:
        hb = beat.poll()
        if hb is not None:
            beats.append((time.monotonic(), hb))
        time.sleep(every_s)
    return beats


def test_position_follows_module_phase_and_step_on_a_real_model():
    assert PHASES == tuple(at.PHASE_NAMES[:3])  # the tracker's row phases are position codes
    seen: list[tuple] = []
    tracker = ModuleTracker(clock="cpu")

    def look(label):
        p = tracker.position
        name = tracker.module_names[p.module] if p.module != at.NO_MODULE else None
        seen.append((label, p.step, at.PHASE_NAMES[p.phase], name, p.passes))

    net = Net(look)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.register_step_pre_hook(lambda *a: look("optimizer"))  # after the tracker's own pre hook
    with tracker:
        for _ in range(2):
            look("data")
            loss = net(torch.randn(4, 8)).sum()
            look("after forward")
            loss.backward()
            look("after backward")
            opt.step()
    look("after the step")
    assert seen[:6] == [
        ("data", 0, "data", None, 0),
        ("forward", 0, "forward", "Net.block", 0),
        ("after forward", 0, "outside", None, 0),
        ("backward", 0, "backward", "Net.block", 1),
        ("after backward", 0, "outside", None, 1),
        ("optimizer", 0, "optimizer", None, 1),
    ], seen
    assert seen[6][:3] == ("data", 1, "data") and seen[-1][:3] == ("after the step", 2, "data")


def test_heartbeat_reports_a_thread_blocked_in_c_code_then_that_it_moves():
    """The training thread blocks in Event.wait (C code, GIL released) in a module's forward; the
    heartbeat, polled from another thread, names the module and shows the stack; then the step ends."""
    release = threading.Event()
    tracker = ModuleTracker(clock="cpu")
    steps = {"n": 0}

    def look(label):
        if label == "forward" and steps["n"] == 5:
            release.wait(30)

    def train():
        net = Net(look)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with tracker:  # entered on this thread: the heartbeat shows this thread's stack
            for i in range(7):
                steps["n"] = i
                net(torch.randn(4, 8)).sum().backward()
                opt.step()
                time.sleep(0.02)  # a step of ~20 ms: the median

    beat = Heartbeat(
        tracker.position, lambda: tracker.module_names, HeartbeatSettings(factor=3, min_s=0.3, repeat_s=0.2)
    )
    worker = threading.Thread(target=train, daemon=True)
    worker.start()
    beats = poll_beats(beat, 2, every_s=0.01)
    release.set()
    assert len(beats) == 2, beats
    first = beats[0][1]
    assert (first.step, first.phase, first.module, first.running) == (5, "forward", "Net.block", False)
    assert first.step_ns >= 0.3e9 and first.repeat_ms == 200 and 0 < first.median_step_ns < 0.3e9
    assert any("test_stall.py" in line and "in look: release.wait(30)" in line for line in first.stack[-4:])
    assert "threading.py" in first.stack[-1] and len(first.stack) <= 24
    assert not any("_call_impl" in line for line in first.stack)  # nn.Module's call plumbing is left out
    # repeats at repeat_s, not at every poll: read on the heartbeat's own clock (both beats are of the same stuck
    # step, so their step_ns differ by the time between them), not on the poller's, which a loaded machine delays
    assert beats[1][1].step_ns - first.step_ns >= 0.2e9, (first.step_ns, beats[1][1].step_ns)
    assert beats[1][1].step == first.step
    moved = None
    deadline = time.monotonic() + 10
    while moved is None and time.monotonic() < deadline:
        moved = beat.poll()
        time.sleep(0.01)
    assert moved is not None and moved.running and moved.step == 6, moved
    worker.join(10)
    assert beat.errors == 0


def test_no_heartbeat_for_short_steps_or_before_the_first_step():
    position = at.Position(0)
    now = [0]
    beat = Heartbeat(position, list, HeartbeatSettings(min_s=1.0), clock=lambda: now[0])
    now[0] = 10 * 10**9  # ten seconds in step 0: start-up, no median yet
    assert beat.poll() is None
    for step in range(1, 20):  # steps of 100 ms
        position.new_step(step, step * 10**8 + 10 * 10**9)
        now[0] = position.step_start_ns + 5 * 10**7
        assert beat.poll() is None
    now[0] = position.step_start_ns + 9 * 10**8  # 0.9 s: over 3x the median, under min_s
    assert beat.poll() is None
    now[0] = position.step_start_ns + 11 * 10**8
    hb = beat.poll()
    assert hb is not None and hb.phase == "data" and hb.module == "" and hb.median_step_ns == 10**8


def test_thread_stack_is_innermost_last_and_bounded():
    stack = thread_stack(threading.get_ident(), 3)
    assert len(stack) == 3 and "in test_thread_stack_is_innermost_last_and_bounded" in stack[-2]
    assert "in thread_stack" in stack[-1]


# ---- the verdict's rules ---------------------------------------------------------------------
def beat(step=10, phase="forward", module="Net.block", seconds=8.0, step_seconds=9.0, stack=(USER,), passes=0):
    return Beat(step, phase, module, seconds, step_seconds, list(stack), passes)


def waiting_beat(**kw):
    return beat(
        **{
            "phase": "backward",
            "module": None,
            "stack": ("train.py:9 in main: loss.backward()", DDP_WAIT),
            "passes": 1,
            **kw,
        }
    )


def test_the_rank_not_in_a_collective_is_stuck_and_the_others_wait():
    answer = verdict(
        "j",
        [
            RankView(0, "h0", beat=waiting_beat()),
            RankView(1, "h1", beat=beat()),
            RankView(2, "h2", beat=beat(stack=(GLOO_WAIT,), module="Net.head")),
        ],
    )
    assert answer["stalled"] and answer["step"] == 10 and answer["since_s"] == 8.0
    assert [r["state"] for r in answer["ranks"]] == ["waiting", "stuck", "waiting"]
    assert answer["ranks"][1]["stack"] == [USER] and answer["summary"].startswith("rank 1 stuck in Net.block")


def test_without_collectives_the_rank_behind_is_stuck():
    answer = verdict(
        "j",
        [
            RankView(0, "h", beat=beat(step=11, phase="data", module=None)),
            RankView(1, "h", beat=beat(step=10, phase="outside", passes=1, module=None)),
            RankView(2, "h", beat=beat(step=11, phase="forward")),
        ],
    )
    assert [r["state"] for r in answer["ranks"]] == ["waiting", "stuck", "waiting"]
    ordered = verdict("j", [RankView(0, "h", beat=waiting_beat(stack=(USER,))), RankView(1, "h", beat=beat())])
    assert [r["state"] for r in ordered["ranks"]] == ["waiting", "stuck"]  # forward is before backward


def test_every_rank_still_in_the_same_place_is_a_pause():
    ranks = [RankView(r, "h", beat=beat(phase="data", module=None, seconds=6.0 + r)) for r in range(3)]
    answer = verdict("j", ranks)
    assert not answer["stalled"] and answer["paused"]["phase"] == "data" and answer["since_s"] == 6.0
    assert {r["state"] for r in answer["ranks"]} == {"running"}  # CONTRACT.md's states: nobody stuck or waiting
    assert "paused at data, step 10" in answer["summary"]
    text = render_stall(answer)  # `collector query stall`
    assert text.startswith("job j: paused for 6 s: the whole job is paused at data, step 10"), text
    assert text.endswith(f"stack where the job is paused, innermost last:\n  {USER}"), text


def test_a_slow_but_moving_job_is_not_stalled():
    moving = [RankView(0, "h", beat=waiting_beat()), RankView(1, "h", beat=beat(seconds=0.4, step_seconds=30))]
    assert not verdict("j", moving)["stalled"]
    one_running = [RankView(0, "h", beat=waiting_beat()), RankView(1, "h")]  # rank 1 ends steps
    answer = verdict("j", one_running)
    assert not answer["stalled"] and [r["state"] for r in answer["ranks"]] == ["running", "running"]


def test_a_missing_rank_neither_blocks_nor_is_blamed():
    answer = verdict(
        "j", [RankView(0, "h", beat=waiting_beat()), RankView(1, "h", beat=beat()), RankView(2, "h", missing=True)]
    )
    assert [r["state"] for r in answer["ranks"]] == ["waiting", "stuck", "missing"]


def test_every_rank_waiting_in_one_collective_is_stalled_with_nobody_stuck():
    answer = verdict("j", [RankView(r, "h", beat=beat(stack=(GLOO_WAIT,))) for r in range(2)])
    assert answer["stalled"] and {r["state"] for r in answer["ranks"]} == {"waiting"}


def test_collective_frames():
    assert waits_in_collective(beat(stack=(USER, GLOO_WAIT)))
    assert waits_in_collective(waiting_beat())
    assert not waits_in_collective(beat(stack=(DDP_WAIT,), phase="backward"))  # inside a module's backward
    assert not waits_in_collective(beat(stack=()))


# ---- the watch: freshness, stream end, alerts --------------------------------------------------
class _Job:
    def __init__(self, world):
        self.world_size = world
        self.ranks = {r: type("R", (), {"host": f"h{r}", "state": "live"})() for r in range(world)}


def hb(**kw):
    base = dict(
        step=10,
        phase="forward",
        module="Net.block",
        step_ns=9 * 10**9,
        position_ns=8 * 10**9,
        stack=[USER],
        repeat_ms=1000,
    )
    return pb.Heartbeat(**{**base, **kw})


def test_watch_ages_beats_drops_stale_and_ended_ones_and_alerts_once():
    now = [100.0]
    watch = StallWatch(clock=lambda: now[0])
    jobs = {"j": _Job(2)}
    owner = object()
    watch.heartbeat("j", 0, hb(phase="backward", module="", stack=[DDP_WAIT], backward_passes=1), owner)
    watch.heartbeat("j", 1, hb(), owner)
    now[0] += 2
    answer = watch.verdict("j", jobs["j"])
    assert answer["stalled"] and answer["ranks"][1]["seconds"] == 10.0
    watch.evaluate(jobs, None)
    watch.evaluate(jobs, None)
    [alert] = watch.alerts()
    assert alert["labels"] == {
        "alertname": "ModtrackJobStalled",
        "severity": "critical",
        "job": "j",
        "rank": "1",
        "host": "h1",
        "module": "Net.block",
        "phase": "forward",
    }
    assert alert["status"] == "firing" and "time.sleep(3600)" in alert["annotations"]["description"]
    [family] = list(watch.collect())
    assert [s.value for s in family.samples] == [10.0]
    watch.heartbeat("j", 1, pb.Heartbeat(step=11, running=True), owner)  # it moves again
    assert not watch.verdict("j", jobs["j"])["stalled"]
    watch.evaluate(jobs, None)
    assert watch.alerts() == [] and list(watch.collect())[0].samples == []
    watch.heartbeat("j", 1, hb(), owner)
    watch.gone("j", 1, object())  # another stream of the rank ended: not this one's beat
    assert watch.verdict("j", jobs["j"])["stalled"]
    watch.gone("j", 1, owner)
    assert not watch.verdict("j", jobs["j"])["stalled"]
    watch.heartbeat("j", 1, hb(), owner)
    now[0] += 11  # no heartbeat for over 3 repeat intervals (and 10 s): stale
    assert not watch.verdict("j", jobs["j"])["stalled"]


# ---- over real gRPC: the API, the CLI, bad heartbeats ---------------------------------------------
def test_stall_api_and_cli_over_grpc(tmp_path):
    c = CollectorThread(tmp_path / "data")
    ranks = [FakeRank(c.grpc_target, "hung", r, 2) for r in range(2)]
    try:
        ranks[0].send(pb.AgentMessage(heartbeat=hb(phase="backward", module="", stack=[DDP_WAIT], backward_passes=1)))
        ranks[1].send(pb.AgentMessage(heartbeat=hb(module="Net.blocks.1")))
        status, answer = wait_stall_with_every_beat(c.url, "hung")
        assert status == 200 and set(answer) >= {"job", "stalled", "since_s", "step", "ranks"}
        assert [(r["rank"], r["host"], r["state"], r["phase"], r["module"]) for r in answer["ranks"]] == [
            (0, "host0", "waiting", "backward", None),
            (1, "host1", "stuck", "forward", "Net.blocks.1"),
        ]
        assert answer["ranks"][1]["stack"] == [USER] and answer["ranks"][1]["seconds"] >= 8
        wait_for(
            lambda: any(
                a["labels"]["alertname"] == "ModtrackJobStalled" for a in get(c.url, "/api/v1/alerts")[1]["alerts"]
            ),
            10,
        )
        cli = [sys.executable, "-m", "modtrack.collector", "query", "stall", "--url", c.url, "--job", "hung"]
        text = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert text.returncode == 0, text.stderr
        assert "STALLED" in text.stdout and "rank 1 stuck in Net.blocks.1 (forward)" in text.stdout, text.stdout
        assert "time.sleep(3600)" in text.stdout and "waiting" in text.stdout
        as_json = subprocess.run(cli + ["--json"], capture_output=True, text=True, timeout=60)
        assert json.loads(as_json.stdout)["stalled"] is True
        assert get(c.url, "/api/v1/jobs/nobody/stall")[0] == 404
        ranks[1].send(pb.AgentMessage(heartbeat=hb(phase="nowhere")))  # refused at the edge
        ranks[1].wait_done(10)
        assert ranks[1].error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown phase 'nowhere'" in ranks[1].error.details()
        wait_for(lambda: not get(c.url, "/api/v1/jobs/hung/stall")[1]["stalled"], 10)  # its stream ended
    finally:
        for r in ranks:
            r.kill()
        c.stop()


def test_a_rank_that_sends_heartbeats_is_not_marked_missing(tmp_path):
    """A hung job reports no step for long: its ranks are stuck or waiting, not missing."""
    c = CollectorThread(tmp_path / "data", missing_after_s=0.6)
    ranks = [FakeRank(c.grpc_target, "hung", r, 2) for r in range(2)]
    try:
        for _ in range(8):  # 2 s of heartbeats, no report
            for r in ranks:
                r.send(pb.AgentMessage(heartbeat=hb()))
            time.sleep(0.25)
        [job] = get(c.url, "/api/v1/jobs")[1]["jobs"]
        assert job["ranks_reporting"] == 2, job
        # no heartbeat any more: missing after missing_after_s, as before
        wait_for(lambda: get(c.url, "/api/v1/jobs")[1]["jobs"][0]["ranks_reporting"] == 0, 10)
    finally:
        for r in ranks:
            r.kill()
        c.stop()


def test_a_rank_calling_the_same_module_again_and_again_moves():
    """A recurrent loop: every look finds the rank in the same module and phase, but each time after a new
    call of its cell, so the heartbeat's time at the position stays short (the verdict: moving, not stuck)."""
    tracker = ModuleTracker(clock="cpu")
    done = threading.Event()

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.Linear(8, 8)

        def forward(self, x, long=False):
            x = self.cell(x)
            while long and not done.is_set():  # time spent in Loop itself, between calls of its cell
                time.sleep(0.02)
                x = self.cell(x)
            return x

    loop = Loop()

    def train():
        with tracker, torch.no_grad():
            for _ in range(3):  # short steps, long enough for the heartbeat's looks (every 50 ms) to see: a median
                loop(torch.randn(2, 8))
                time.sleep(0.1)
                tracker.step()
            loop(torch.randn(2, 8), long=True)  # one long step

    beat = Heartbeat(tracker.position, lambda: tracker.module_names, HeartbeatSettings(min_s=0.3, repeat_s=0.1))
    worker = threading.Thread(target=train, daemon=True)
    worker.start()
    beats = [hb for _, hb in poll_beats(beat, 5, every_s=0.05)]
    done.set()
    worker.join(10)
    assert len(beats) == 5 and beat.errors == 0, beats
    # in Loop's own wait between its cell's calls, or (a look that lands during one) in the cell: never elsewhere
    assert {(hb.step, hb.phase) for hb in beats} == {(3, "forward")}, beats
    assert {hb.module for hb in beats} <= {"Loop", "Loop.cell"} and any(hb.module == "Loop" for hb in beats), beats
    assert all(hb.position_ns < 0.2e9 < 0.3e9 <= hb.step_ns for hb in beats), [
        (b.position_ns, b.step_ns) for b in beats
    ]
