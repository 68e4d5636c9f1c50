"""The dashboard in a real headless Chromium, against a real collector.

Two feeds: simulated ranks streaming protobuf reports over real gRPC (fast; also drives the
capture button end to end), and a real multi-rank torchrun of examples/train.py under the agent
with an injected straggler (slow). Either way the page must load with no console error, outline
the culprit's heatmap cell and name the culprit in the straggler list.

MODTRACK_SCREENSHOT=docs/dashboard.png also saves the torchrun run's screenshot there (README).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from harness import torchrun as launch
from harness.browser import console_errors, wait_js
from harness.chrome_trace import assert_valid_chrome_trace
from harness.collector_process import CollectorProcess
from harness.waiting import wait_for
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


# ---- the collector -------------------------------------------------------------------------


def running_collector(tmp_path, *extra: str) -> CollectorProcess:
    """`python -m modtrack.collector serve` on free loopback ports, as the dashboard tests want it."""
    return CollectorProcess(
        tmp_path / "data", "--watermark-s", "0.5", "--log-level", "WARNING", *extra, log_path=tmp_path / "collector.log"
    )


@pytest.fixture
def collector(tmp_path):
    with running_collector(tmp_path) as c:
        yield c


# ---- the page (the browser fixture: tests/conftest.py) ----------------------------------


def page_state(driver) -> dict:
    return driver.execute_script("""
        const culprit = [...document.querySelectorAll('#heatmap td[data-culprit="true"]')]
            .map(td => ({rank: td.dataset.rank, module: td.dataset.module, phase: td.dataset.phase}));
        const rows = [...document.querySelectorAll('#straggler-rows tr[data-rank]')]
            .map(tr => ({rank: tr.dataset.rank, module: tr.dataset.module, state: tr.dataset.state,
                         ranks: tr.dataset.ranks}));
        const hot = [...document.querySelectorAll('#heatmap td[data-slowdown]')]
            .sort((a, b) => b.dataset.slowdown - a.dataset.slowdown)[0];
        return {culprit, rows, verdict: document.getElementById('verdict-title').textContent,
                hottest: hot ? {rank: hot.dataset.rank, module: hot.dataset.module} : null,
                lines: document.querySelectorAll('#step-chart polyline[data-culprit="true"]').length,
                steps: state.steps.length};
    """)


# ---- simulated ranks -----------------------------------------------------------------------

ROOT_MODULE = "TinyGPT"
BLOCKS = [f"{ROOT_MODULE}.blocks.{i}" for i in range(2)]
# (name, parent index, self ms forward): a GPT-like tree, in call order
TREE = [(ROOT_MODULE, -1, 0.3), (f"{ROOT_MODULE}.embed", 0, 0.4)]
for _b in BLOCKS:
    _bi = len(TREE)
    TREE += [
        (_b, 0, 0.1),
        (f"{_b}.ln1", _bi, 0.2),
        (f"{_b}.attn", _bi, 0.5),
        (f"{_b}.attn.qkv", _bi + 2, 1.2),
        (f"{_b}.attn.proj", _bi + 2, 0.6),
        (f"{_b}.ln2", _bi, 0.2),
        (f"{_b}.mlp", _bi, 0.3),
        (f"{_b}.mlp.fc", _bi + 6, 1.6),
        (f"{_b}.mlp.proj", _bi + 6, 1.5),
    ]
TREE += [(f"{ROOT_MODULE}.ln_f", 0, 0.2), (f"{ROOT_MODULE}.head", 0, 1.1)]
NAMES = [t[0] for t in TREE]
SLOW_MODULE, SLOW_PHASE = f"{ROOT_MODULE}.blocks.1.mlp", 2


def _children(i: int) -> list[int]:
    return [j for j, t in enumerate(TREE) if t[1] == i]


def simulate_rank_step(rank: int, step: int, t0: int, slow_rank: int, slow_ms: float, rng):
    """One step of one rank on its own clock: (StepReport, trace calls)."""
    calls = []  # (module, phase, start, end, depth)

    def run(i: int, phase: int, t: int, depth: int) -> int:
        start = t
        self_ms = TREE[i][2] * (2.0 if phase == 2 else 1.0) * rng.uniform(0.95, 1.05)
        if rank == slow_rank and phase == SLOW_PHASE and NAMES[i] == SLOW_MODULE:
            self_ms += slow_ms
        half = int(self_ms * 5e5)
        t += half
        kids = _children(i)
        for k in kids if phase == 1 else kids[::-1]:
            t = run(k, phase, t, depth + 1)
        t += half
        calls.append((i, phase, start, t, depth))
        return t

    fwd_end = run(0, 1, t0 + 200_000, 0)
    bwd_end = run(0, 2, fwd_end + 50_000, 0)
    return calls, fwd_end, bwd_end


def build_report(step: int, calls, t0: int, fwd_end: int, bwd_end: int, tail_ns: int, with_trace: str | None):
    c = np.array(calls, dtype=np.int64)
    report = pb.StepReport(step=step, start_ns=t0)
    for phase in (1, 2):
        sel = c[c[:, 1] == phase]
        order = np.argsort(sel[:, 0])
        sel = sel[order]
        incl = sel[:, 3] - sel[:, 2]
        self_ns = incl.copy()
        for row_i, row in enumerate(sel):  # minus the children's inclusive time
            for k in _children(int(row[0])):
                self_ns[row_i] -= incl[np.flatnonzero(sel[:, 0] == k)[0]]
        report.phases.append(
            pb.PhaseStats(
                phase=phase,
                module_id=sel[:, 0].tolist(),
                calls=[1] * len(sel),
                inclusive_ns=incl.tolist(),
                self_ns=self_ns.tolist(),
                first_start_ns=sel[:, 2].tolist(),
                last_end_ns=sel[:, 3].tolist(),
            )
        )
    report.forward_ns = int(fwd_end - t0 - 200_000)
    report.backward_ns = int(bwd_end - fwd_end - 50_000 + tail_ns)
    report.backward_tail_ns = int(tail_ns)
    report.optimizer_ns = 300_000
    report.data_ns = 250_000
    report.end_ns = int(bwd_end + tail_ns + 300_000)
    if with_trace:
        order = np.lexsort((c[:, 4], c[:, 2]))
        t = c[order]
        report.trace.CopyFrom(
            pb.Trace(
                module_id=t[:, 0].tolist(),
                phase=t[:, 1].tolist(),
                start_ns=t[:, 2].tolist(),
                end_ns=t[:, 3].tolist(),
                depth=t[:, 4].tolist(),
                capture_id=with_trace,
            )
        )
    return report


class SimulatedJob:
    """`world` ranks streaming to the collector over real gRPC, rank `slow_rank` slow in one
    module's backward from `slow_from` on; the others wait for it in the gradient all-reduce.
    Ranks answer capture requests with full traces. Runs until stop()."""

    def __init__(
        self,
        addr: str,
        job: str,
        world: int = 4,
        slow_rank: int = 2,
        slow_ms: float = 6.0,
        slow_from: int = 8,
        step_s: float = 0.05,
        clock_shift_ns: dict | None = None,
        token: str | None = None,
    ):
        self.addr, self.job, self.world = addr, job, world
        self.slow_rank, self.slow_ms, self.slow_from, self.step_s = slow_rank, slow_ms, slow_from, step_s
        self.shift = clock_shift_ns or {}
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.steps_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.error: BaseException | None = None

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(20)

    async def _main(self):
        import grpc

        try:
            async with grpc.aio.insecure_channel(self.addr) as channel:
                stub = pb_grpc.CollectorStub(channel)
                queues = [asyncio.Queue() for _ in range(self.world)]
                captures = [{} for _ in range(self.world)]
                calls = [stub.Stream(self._requests(r, queues[r]), metadata=self.metadata) for r in range(self.world)]
                readers = [asyncio.create_task(self._read(c, captures[r])) for r, c in enumerate(calls)]
                rng = np.random.default_rng(0)
                step = 0
                base = time.time_ns()
                while not self._stop.is_set():
                    step += 1
                    slow = self.slow_rank if step >= self.slow_from else -1
                    t0 = base + step * 80_000_000
                    sims = [simulate_rank_step(r, step, t0, slow, self.slow_ms, rng) for r in range(self.world)]
                    longest = max(bwd for _, _, bwd in sims)
                    for r, (c, fwd_end, bwd_end) in enumerate(sims):
                        trace = None
                        if captures[r].get("left", 0) > 0:
                            captures[r]["left"] -= 1
                            trace = captures[r]["id"]
                        report = build_report(step, c, t0, fwd_end, bwd_end, longest - bwd_end + 100_000, trace)
                        _shift(report, self.shift.get(r, 0))
                        await queues[r].put(pb.AgentMessage(report=report))
                    self.steps_sent = step
                    await asyncio.sleep(self.step_s)
                for q in queues:
                    await q.put(None)
                await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), 10)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    async def _requests(self, rank: int, queue: asyncio.Queue):
        yield pb.AgentMessage(
            hello=pb.Hello(
                protocol_version=1,
                job=self.job,
                rank=rank,
                local_rank=rank % 2,
                world_size=self.world,
                group_rank=rank // 2,
                host=f"node{rank // 2}",
                pid=1000 + rank,
                torch_version="sim",
                agent_version="sim",
                clock_kind=pb.CLOCK_KIND_CPU,
                module_names=NAMES,
                session=f"s{rank}",
            )
        )
        yield pb.AgentMessage(clock=pb.ClockOffset(offset_ns=-self.shift.get(rank, 0), rtt_ns=50_000))
        while (msg := await queue.get()) is not None:
            yield msg

    async def _read(self, call, capture: dict):
        async for msg in call:
            if msg.WhichOneof("body") == "control" and msg.control.WhichOneof("action") == "capture":
                capture.update(id=msg.control.capture.capture_id, left=msg.control.capture.steps)


def _shift(report, ns: int) -> None:
    """Move a report onto a clock that reads `ns` ahead of the collector's."""
    if not ns:
        return
    report.start_ns += ns
    report.end_ns += ns
    for ph in report.phases:
        ph.first_start_ns[:] = [v + ns for v in ph.first_start_ns]
        ph.last_end_ns[:] = [v + ns for v in ph.last_end_ns]
    if report.HasField("trace"):
        report.trace.start_ns[:] = [v + ns for v in report.trace.start_ns]
        report.trace.end_ns[:] = [v + ns for v in report.trace.end_ns]


@pytest.fixture
def simulated_job(collector):
    job = SimulatedJob(collector.grpc_target, "sim-job", clock_shift_ns={3: 5_000_000_000}).start()
    try:
        yield job
    finally:
        job.stop()


# ---- the tests -----------------------------------------------------------------------------


def _wait_for_straggler(collector, job: str, timeout: float = 90.0) -> dict:
    def active():
        found = collector.get(f"/api/v1/jobs/{job}/stragglers")["stragglers"]
        return [s for s in found if s["state"] == "active"]

    return wait_for(active, timeout, f"a straggler in {job}", interval=0.5, retry_on=(OSError,))[0]


@pytest.mark.slow
def test_dashboard_shows_the_simulated_culprit_and_captures_a_trace(collector, simulated_job, browser, tmp_path):
    straggler = _wait_for_straggler(collector, "sim-job")
    assert (straggler["rank"], straggler["module"], straggler["phase"]) == (2, SLOW_MODULE, "backward")

    browser.get(collector.url + "/")
    wait_js(browser, "document.querySelector('#heatmap td[data-culprit=\"true\"]')", what="the culprit's cell")
    state = page_state(browser)
    assert state["culprit"] == [{"rank": "2", "module": SLOW_MODULE, "phase": "backward"}]
    assert state["hottest"] == {"rank": "2", "module": SLOW_MODULE}
    assert {"rank": "2", "module": SLOW_MODULE, "state": "active", "ranks": "2"} in state["rows"]
    assert "rank 2 @ node1" in state["verdict"]
    assert state["lines"] == 1  # the culprit's step-time line is the highlighted one
    # a verdict whose peers spend nothing in its cause (garbage collection: no ratio) shows its excess instead
    gc_entry = {"module": "(garbage collection)", "phase": "gc", "excess_ms": 41.5, "slowdown": None}
    gc_verdict = {"module": "(garbage collection)", "phase": "gc", "slowdown": 1.0, "modules": [gc_entry]}
    assert browser.execute_script("return slowdownText(arguments[0])", gc_verdict) == "+41.5 ms"
    assert browser.execute_script("return slowdownText(arguments[0])", straggler) == f"{straggler['slowdown']:.2f}×"

    # live refresh: the page moves on without a reload
    first = browser.execute_script("return document.getElementById('heat-window').textContent")
    wait_js(browser, f"document.getElementById('heat-window').textContent !== {json.dumps(first)}", 20, "a refresh")

    # the forward/backward switch and the module bars
    browser.find_element("id", "phase-forward").click()
    assert not browser.find_elements("css selector", '#heatmap td[data-culprit="true"]')
    browser.find_element("id", "phase-backward").click()
    browser.find_element("css selector", f'#heatmap th.module[data-module="{SLOW_MODULE}"]').click()
    bars = browser.execute_script("""return [...document.querySelectorAll('#module-bars .bar-row')]
        .map(b => [b.dataset.rank, b.dataset.culprit])""")
    assert bars == [["0", "false"], ["1", "false"], ["2", "true"], ["3", "false"]]

    # capture: the button asks the ranks for a trace; once it is in, download is enabled
    browser.find_element("id", "capture-btn").click()
    wait_js(browser, "!document.getElementById('trace-download').disabled", 60, "the captured trace")
    status = browser.find_element("id", "capture-status").text
    assert "is in" in status
    trace = browser.execute_script("return state.capture.trace")
    assert_valid_chrome_trace(trace)
    assert trace["otherData"]["source"] == "capture" and len(trace["otherData"]["captured_steps"]) >= 3
    procs = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert procs == {0: "rank 0 @ node0", 1: "rank 1 @ node0", 2: "rank 2 @ node1", 3: "rank 3 @ node1"}
    # rank 3's clock runs 5 s ahead; corrected, its steps line up with rank 0's
    starts = {
        pid: min(e["ts"] for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == pid and e["cat"] == "step")
        for pid in (0, 3)
    }
    assert abs(starts[3] - starts[0]) < 1000  # µs

    # a range with no capture falls back to the per-step summary spans, every rank present
    summary = collector.get("/api/v1/jobs/sim-job/trace?from_step=2&to_step=4")
    assert_valid_chrome_trace(summary)
    assert summary["otherData"]["source"] == "step_summary"
    assert {e["pid"] for e in summary["traceEvents"] if e["ph"] == "X" and e["cat"] == "backward"} == {0, 1, 2, 3}
    for bad, status in (("from_step=5&to_step=2", 400), ("from_step=x", 400), ("from_step=0&to_step=999", 400)):
        with pytest.raises(urllib.error.HTTPError) as err:
            collector.get(f"/api/v1/jobs/sim-job/trace?{bad}")
        assert err.value.code == status
    with pytest.raises(urllib.error.HTTPError) as err:
        collector.get("/api/v1/jobs/nope/trace")
    assert err.value.code == 404

    errors = console_errors(browser)
    assert not errors, errors
    shot = tmp_path / "dashboard-sim.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    assert simulated_job.error is None


# ---- a real torchrun job ------------------------------------------------------------------

TORCHRUN_RANKS, TORCHRUN_SLOW_RANK = 4, 2
TORCHRUN_MODULE = "TinyGPT.blocks.1.mlp"


@pytest.fixture
def torchrun_job(collector, tmp_path):
    """examples/train.py (the scenario benchmark's model) on 4 CPU ranks (gloo) under the agent; rank 2 slow in
    blocks.1.mlp's backward from step 4. Long enough to still be running while the page is inspected."""
    cmd = launch.torchrun_cmd(
        TORCHRUN_RANKS, "-m", "modtrack.agent", "--collector", collector.grpc_target, "--job", "ddp-demo",
        launch.TRAIN, "--steps", "400", "--threads", "1", "--log-every", "1000",
        "--dim", "64", "--batch", "8", "--context", "32", "--vocab", "256",  # a ~50 ms step on 4 ranks, 2 cores
        "--slow-rank", str(TORCHRUN_SLOW_RANK), "--slow-module", "blocks.1.mlp", "--slow-phase", "backward",
        "--slow-ms", "50", "--slow-from-step", "4")  # fmt: skip
    log = open(tmp_path / "torchrun.log", "w")
    proc = launch.start(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        launch.end(proc, grace_s=20)  # SIGTERM first: torchrun passes it on to its ranks
        log.close()


def _culprit_shown(driver, min_steps: int = 0) -> bool:
    state = page_state(driver)
    if state["steps"] < min_steps:
        return False
    cell = {"rank": str(TORCHRUN_SLOW_RANK), "module": TORCHRUN_MODULE, "phase": "backward"}
    named = [
        r
        for r in state["rows"]
        if r["module"] == TORCHRUN_MODULE and r["state"] == "active" and r["rank"] == str(TORCHRUN_SLOW_RANK)
    ]
    verdict = TORCHRUN_MODULE in state["verdict"] and f"rank {TORCHRUN_SLOW_RANK} @ " in state["verdict"]
    return cell in state["culprit"] and bool(named) and verdict


@pytest.mark.slow
def test_dashboard_names_the_culprit_of_a_real_torchrun_job(collector, torchrun_job, browser, tmp_path):
    browser.get(collector.url + "/")

    # wait for the culprit with some history on the chart (and take the picture right then:
    # the page shows what the detector says, and that may flicker between episodes)
    def shown() -> bool:
        if torchrun_job.poll() is not None:
            raise AssertionError(
                "torchrun ended before the page showed the culprit:\n" + (tmp_path / "torchrun.log").read_text()[-3000:]
            )
        return _culprit_shown(browser, min_steps=20)

    wait_for(shown, 240, lambda: f"the page to show the culprit: {page_state(browser)}", interval=0.5)
    errors = console_errors(browser)
    assert not errors, errors

    # the whole page in one picture (kept for the README when MODTRACK_SCREENSHOT says where)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1440, max(900, height + 20))
    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("MODTRACK_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / os.environ["MODTRACK_SCREENSHOT"])

    # the capture button asks the real agents for a full trace of the next steps
    browser.find_element("id", "capture-steps").clear()
    browser.find_element("id", "capture-steps").send_keys("2")
    browser.find_element("id", "capture-btn").click()
    wait_js(browser, "!document.getElementById('trace-download').disabled", 90, "the captured trace")
    trace = browser.execute_script("return state.capture.trace")
    assert_valid_chrome_trace(trace)
    assert trace["otherData"]["source"] == "capture"
    ranks_with_calls = {e["pid"] for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "forward"}
    assert ranks_with_calls == set(range(TORCHRUN_RANKS))
    assert not console_errors(browser)


@pytest.mark.slow
def test_the_page_sends_the_token_it_was_opened_with(tmp_path, browser):
    (tmp_path / "token").write_text("s3cret-token\n")
    with running_collector(tmp_path, "--token-file", str(tmp_path / "token")) as collector:
        job = SimulatedJob(collector.grpc_target, "secured", world=2, slow_rank=-1, token="s3cret-token").start()
        try:
            browser.get(collector.url + "/#token=s3cret-token")
            wait_js(browser, "document.querySelector('#jobs button[data-job=\"secured\"]')", 30, "the job list")
            assert browser.execute_script("return location.hash") == ""  # not left in the address bar
            wait_js(browser, "document.querySelector('#heatmap td[data-slowdown]')", 30, "the heatmap")
            assert not console_errors(browser)
            browser.get(collector.url + "/")  # remembered for the next visit
            wait_js(browser, "document.querySelector('#jobs button[data-job=\"secured\"]')", 30, "the job list again")
            browser.execute_script("localStorage.clear()")
            browser.get(collector.url + "/")  # no token: the page asks for one instead of showing data
            wait_js(browser, "!document.getElementById('token-form').hidden", 30, "the token prompt")
            assert not browser.find_elements("css selector", "#jobs button")
        finally:
            job.stop()
        assert job.error is None
