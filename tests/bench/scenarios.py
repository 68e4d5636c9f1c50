"""Straggler scenarios on real torchrun jobs: is the verdict right, and is its cost what the job lost?

Each scenario runs examples/train.py under the agent on CPU ranks (gloo), with a known busy wait
injected on one rank (a module's forward or backward, four modules, every module, data loading,
the optimizer; persistent, 1 step in 3, a ramp, stopping, or in the second attempt of a job that
torchrun restarts), then reads the collector's verdict back over its HTTP API. The truth comes from
outside the collector: the culprit's rank and what was injected, and the ranks' own step times
(examples/train.py --step-times), whose growth after the onset is what the job really lost.

    python tests/bench/scenarios.py                        # the whole matrix (long: ~100 torchrun jobs)
    python tests/bench/scenarios.py --wraps ddp --culprits middle --shapes bwd1,four,data
    python tests/bench/scenarios.py --results out.jsonl ...   # append results; --report out.jsonl prints them

Run it under the shared lock (flock /tmp/modtrack-heavy.lock ...). Per scenario it prints: named right
(rank, modules, cause), victims blamed, latency in steps, cost against the measured loss; then the totals.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared harness
from harness.collector_process import REPO, CollectorProcess, env
from modtrack.collector.pipeline.detector import CPU_CLOCK_WARMUP, DetectorParams, params_for_clock

TRAIN = os.path.join(REPO, "examples", "train.py")
MODEL = ["--dim", "64", "--batch", "8", "--context", "32", "--layers", "4", "--heads", "4", "--vocab", "256"]
# A 4x wider model (--model, or a Shape's model): its modules take 1-5 ms, so the CPU clock's floors (1 ms, 1 % of
# the step) judge 36-56 cells per step of a clean 2-3 rank job; the default's DDP job has no module above them.
WIDE = ("--dim", "256", "--context", "64")
ONSET = 15
STEPS = 45
WRAPS = ("ddp", "fsdp2", "fsdp1")
CULPRITS = ("first", "middle", "last")
SLOW_MLP_FORWARD = ["--slow-module", "blocks.1.mlp", "--slow-phase", "forward", "--slow-ms", "30"]
SLOW_ATTN_BACKWARD = ["--slow-module", "blocks.2.attn", "--slow-phase", "backward", "--slow-ms", "30"]
FOUR = ("blocks.0.mlp", "blocks.1.attn", "blocks.2.mlp", "blocks.3.attn")


@dataclass
class Shape:
    """One kind of straggler: how it is injected and what a right verdict says."""

    name: str
    args: list[str]  # examples/train.py --slow-* options (the rank is added)
    modules: tuple[str, ...] = ()  # (module) that the verdict must list, if any
    phase: str | None = None
    cause: str | None = None  # a substring of the verdict's cause
    steps: int = STEPS
    max_latency: int = 5
    stops_at: int | None = None  # the fault ends here: the verdict must be resolved
    not_listed: tuple[str, ...] = ()  # modules the verdict must not list, in any phase (where the fault ran)
    restart: bool = False  # the job fails once and torchrun restarts it; the fault is in attempt 1
    clean: bool = False
    model: tuple[str, ...] = ()  # examples/train.py model arguments on top of MODEL (e.g. WIDE)
    onset: int = ONSET  # the first slow step (--onset: a longer quiet window before it, for the truth and the baseline)


def intermittent(every: int, steps: int) -> Shape:
    """One slow step in `every` (40 ms in one module's forward): found within 30 steps, one verdict."""
    args = ["--slow-module", "blocks.1.mlp", "--slow-phase", "forward", "--slow-ms", "40", "--slow-every", str(every)]
    return Shape(f"every{every}", args, ("blocks.1.mlp",), "forward", "intermittent", steps=steps, max_latency=30)


SHAPES = {
    s.name: s
    for s in [
        Shape(
            "fwd1",
            SLOW_MLP_FORWARD,
            ("blocks.1.mlp",),
            "forward",
            "compute in 1 module",
        ),
        Shape(
            "bwd1",
            SLOW_ATTN_BACKWARD,
            ("blocks.2.attn",),
            "backward",
            "compute in 1 module",
        ),
        Shape(
            "four",
            ["--slow-module", ",".join(FOUR), "--slow-phase", "backward", "--slow-ms", "15"],
            FOUR,
            "backward",
            "compute in 4 modules",
        ),
        Shape("whole", ["--slow-phase", "whole", "--slow-ms", "40"], cause="whole rank"),
        Shape("data", ["--slow-phase", "data", "--slow-ms", "40"], ("(data loading)",), "data", "data loading"),
        Shape(
            "host",
            ["--slow-phase", "host", "--slow-ms", "40"],
            ("(host between modules)",),
            "host",
            "host time between modules",
        ),
        Shape(  # fwd1 in a job that evaluates every 10 steps (40 forwards without gradients, on every rank)
            "eval",
            ["--slow-module", "blocks.1.mlp", "--slow-phase", "forward", "--slow-ms", "30", "--eval-every", "10"],
            ("blocks.1.mlp",),
            "forward",
        ),
        Shape(  # fwd1 in a job whose rank 0 saves a checkpoint every 10 steps for 500 ms (its peers wait for it)
            "ckpt",
            ["--slow-module", "blocks.1.mlp", "--slow-phase", "forward", "--slow-ms", "30", "--checkpoint-every", "10"],
            ("blocks.1.mlp",),
            "forward",
        ),
        Shape("ckptclean", ["--checkpoint-every", "10"], clean=True),  # ... and no straggler: no verdict
        Shape(  # gradient accumulation: 4 micro-batches per step, gradients reduced in the last; 10 ms in each forward
            "accum",
            ["--accumulate", "4", "--slow-module", "blocks.1.mlp", "--slow-phase", "forward", "--slow-ms", "10"],
            ("blocks.1.mlp",),
            "forward",
        ),
        Shape(  # ... and 10 ms of the loop's own code between each micro-batch's forward and backward
            "accumhost",
            ["--accumulate", "4", "--slow-phase", "host", "--slow-ms", "10"],
            ("(host between modules)",),
            "host",
            "host time between modules",
        ),
        Shape(  # the loop's code after backward, before the optimizer: gradient clipping, loss.item(), logging
            "post",
            ["--slow-phase", "post", "--slow-ms", "40"],
            ("(host between modules)",),
            "host",
            "host time between modules",
        ),
        Shape(  # ... with the gradients clipped after it (HF Trainer's default): under FSDP its peers wait there
            "clippost",
            ["--clip-grad-norm", "1.0", "--slow-phase", "post", "--slow-ms", "40"],
            ("(host between modules)",),
            "host",
            "host time between modules",
        ),
        Shape(  # gradient clipping and a slow backward module
            "clipbwd1", ["--clip-grad-norm", "1.0", *SLOW_ATTN_BACKWARD], ("blocks.2.attn",), "backward", "compute in 1"
        ),
        Shape(  # gradient clipping and a slow optimizer step
            "clipoptimizer",
            ["--clip-grad-norm", "1.0", "--slow-phase", "optimizer", "--slow-ms", "30"],
            ("(optimizer)",),
            "optimizer",
            "optimizer",
        ),
        Shape("clipclean", ["--clip-grad-norm", "1.0"], clean=True),
        Shape(  # the loop's code blocked on the rank's own I/O before the clip (a slow write). Not told apart under
            # FSDP: every rank is blocked there as long, the culprit in its write and its peers in the clip's
            # all-reduce; only the collectives' arrival order says who came last (MODTRACK_COLLECTIVES=on)
            "clippostio",
            ["--clip-grad-norm", "1.0", "--slow-phase", "post", "--slow-ms", "40", "--slow-blocking"],
            ("(host between modules)",),
            "host",
            "host time between modules",
        ),
        Shape(  # ... and blocked after the optimizer step (a logger's network call)
            "afterio",
            ["--slow-phase", "after", "--slow-ms", "40", "--slow-blocking"],
            ("(host between modules)",),
            "host",
            "host time between modules",
        ),
        Shape(  # the loop's code after the optimizer step (an EMA update, logging): no data loading, though outside
            "after",  # every phase; examples/train.py fetches its batches from a DataLoader
            ["--slow-phase", "after", "--slow-ms", "40"],
            ("(host between modules)",),
            "host",
            "host time between modules",
        ),
        Shape(  # activation checkpointing (transformers' gradient_checkpointing): the slow forward runs again
            "acfwd1",
            ["--activation-checkpointing", *SLOW_MLP_FORWARD],
            ("blocks.1.mlp",),
            "forward",
            "compute in 1 module",
        ),
        Shape(  # ... and a module slow in its backward, under activation checkpointing
            "acbwd1",
            ["--activation-checkpointing", *SLOW_ATTN_BACKWARD],
            ("blocks.2.attn",),
            "backward",
            "compute in 1 module",
        ),
        Shape("acclean", ["--activation-checkpointing"], clean=True),
        Shape(
            "optimizer", ["--slow-phase", "optimizer", "--slow-ms", "30"], ("(optimizer)",), "optimizer", "optimizer"
        ),
        Shape(  # two optimizers stepped one after the other (as Muon and AdamW), the second one slow
            "optimizer2",
            ["--optimizers", "2", "--slow-phase", "optimizer", "--slow-ms", "30"],
            ("(optimizer)",),
            "optimizer",
            "optimizer",
        ),
        Shape(  # a full collection of ~40 ms in blocks.1.mlp's forward: that module is not to blame
            "gc",
            ["--slow-module", "blocks.1.mlp", "--slow-phase", "gc", "--slow-ms", "40"],
            ("(garbage collection)",),
            "gc",
            "garbage collection",
            not_listed=("blocks.1.mlp",),
        ),
        Shape(  # a full collection every third step, as a heap that fills up between them
            "gc3",
            ["--slow-module", "blocks.1.mlp", "--slow-phase", "gc", "--slow-ms", "40", "--slow-every", "3"],
            ("(garbage collection)",),
            "gc",
            "garbage collection, intermittent",
            steps=70,
            max_latency=30,
            not_listed=("blocks.1.mlp",),
        ),
        intermittent(3, steps=70),
        intermittent(5, steps=90),
        Shape(
            "ramp",
            ["--slow-module", "blocks.2.mlp", "--slow-phase", "backward", "--slow-ms", "40", "--slow-ramp-steps", "15"],
            ("blocks.2.mlp",),
            "backward",
            steps=55,
            max_latency=15,
        ),
        Shape(
            "stop",
            [
                "--slow-module",
                "blocks.1.mlp",
                "--slow-phase",
                "forward",
                "--slow-ms",
                "30",
                "--slow-to-step",
                str(ONSET + 12),
            ],
            ("blocks.1.mlp",),
            "forward",
            stops_at=ONSET + 12,
        ),
        Shape(
            "restart",
            [
                "--slow-module",
                "blocks.1.mlp",
                "--slow-phase",
                "backward",
                "--slow-ms",
                "30",
                "--slow-attempt",
                "1",
                "--fail-at-step",
                "8",
            ],
            ("blocks.1.mlp",),
            "backward",
            restart=True,
        ),
        Shape("clean", [], clean=True),
    ]
}


@dataclass
class Result:
    wrap: str
    shape: str
    culprit: int
    ranks: int
    ok_run: bool = True
    named: bool = False  # the culprit's verdict: right rank, modules, cause
    victims: int = 0  # verdicts naming another rank
    false_alarms: int = 0  # verdicts on a clean job, or over before a fault's onset
    clean_steps: int = 0  # a clean job's steps, or a fault's steps before its onset (from the warm-up on)
    latency: int | None = None
    cost: float | None = None  # the collector's cost_ms_per_step
    measured: float | None = None  # the job's step time after the onset minus before (the ranks' own clocks, median)
    measured_se: float | None = None  # its standard error, from the spread of the steps it averages
    cost_error: float | None = None  # (cost - measured) / measured
    attempt_ok: bool | None = None  # restart: both attempts' steps kept and queryable
    cells_judged: float | None = None  # clean jobs: rank x module cells per step above the CPU floors (cells_judged)
    detail: str = ""
    verdicts: list = field(default_factory=list)


AGENT_ENV: dict[str, str] = {}  # --agent-env: agent settings for every job (MODTRACK_CLOCK=wall, ...)


def _env() -> dict:
    """The harness's environment for subprocesses (this checkout importable, no MODTRACK_ settings but
    --agent-env's), one thread."""
    return env(OMP_NUM_THREADS="1", **AGENT_ENV)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


class Collector(CollectorProcess):
    """`python -m modtrack.collector serve` on free ports (harness.collector_process), its log in the work
    folder, ended by stop()."""

    def __init__(self, data_dir: str):
        super().__init__(data_dir, log_path=os.path.join(data_dir, "collector.log"), timeout=60)
        self.grpc = self.grpc_target

    def stop(self) -> None:
        self.terminate()

    def wait_evaluated(self, job: str, last_step: int, attempt: int, timeout_s: float = 60) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            jobs = {j["job"]: j for j in get_json(f"{self.url}/api/v1/jobs")["jobs"]}
            j = jobs.get(job, {})
            if j.get("attempt") == attempt and (j.get("last_evaluated_step") or -1) >= last_step:
                return True
            time.sleep(0.3)
        return False


def culprit_rank(position: str, ranks: int) -> int:
    return {"first": 0, "middle": ranks // 2, "last": ranks - 1}[position]


def run_job(
    collector: Collector,
    job: str,
    wrap: str,
    shape: Shape,
    culprit: int,
    ranks: int,
    workdir: str,
    timeout_s: float = 240,
) -> tuple[subprocess.CompletedProcess, str]:
    times = os.path.join(workdir, f"{job}.times.jsonl")
    restart = ["--max-restarts", "1"] if shape.restart else []
    slow = [] if shape.clean else ["--slow-rank", str(culprit), "--slow-from-step", str(shape.onset), *shape.args]
    from harness.torchrun import torchrun_cmd

    cmd = torchrun_cmd(
        ranks,
        *restart,
        "-m",
        "modtrack.agent",
        "--collector",
        collector.grpc,
        "--job",
        job,
        TRAIN,
        "--steps",
        str(shape.steps),
        "--log-every",
        "1000",
        "--wrap",
        wrap,
        "--step-times",
        times,
        *MODEL,
        *shape.model,
        *slow,
    )
    proc = subprocess.Popen(
        cmd, env=_env(), cwd=REPO, text=True, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        out, err = "", "timed out"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), times


def step_medians(times_path: str, attempt: int) -> dict[int, float] | None:
    """Each step's time of one attempt, the median over the ranks' own clocks (train.py --step-times)."""
    try:
        with open(times_path) as f:
            rows = [json.loads(line) for line in f]
    except OSError:
        return None
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if r["attempt"] == attempt:
            by_step.setdefault(r["step"], []).append(r["ms"])
    return {step: statistics.median(v) for step, v in by_step.items()}


def measured_loss(
    times_path: str, attempt: int, onset: int, end: int | None = None, every: int = 1, se: bool = False
) -> float | tuple[float, float] | None:
    """What the job lost per step, from the ranks' own step times; se: with its standard error. end: the step
    after the last one judged (None: the file's last step, as many as the job ran).

    A step's time is the median over the ranks' own clocks (rank 0's alone in files written before every rank
    wrote its own: on shared cores one rank's step boundary moves by tens of ms against its peers').
    Persistent: the mean step time over [end - 30, end) (no earlier than the onset) minus the mean over [5, onset);
    its SE from the two means' spreads (drift of the host's load between the windows is not in it).
    Intermittent (one slow step in `every`): each slow step since the onset against the median of its unslowed
    neighbours (within every - 1 steps), the median of these deltas over N: the loss per step averaged over slow
    and fast steps. Paired with its neighbours, a slow step's delta carries none of the host's drift over the run,
    which on a shared machine moves the job's pace by more than 1-in-N adds; the median ignores a neighbour's
    preemption spike. Its SE is the median's (1.25 x the deltas' robust spread / sqrt(count)), over N too."""
    ms = step_medians(times_path, attempt)
    if ms is None:
        return None
    if end is None:
        end = max(ms, default=0) + 1
    if every > 1:
        return _intermittent_loss(ms, onset, end, every, se)
    after = [ms[s] for s in range(max(onset, end - 30), end) if s in ms]
    before = [ms[s] for s in range(5, onset) if s in ms]
    if len(before) < 5 or len(after) < 5:
        return None
    loss = statistics.fmean(after) - statistics.fmean(before)
    if not se:
        return loss
    return loss, math.sqrt(statistics.variance(after) / len(after) + statistics.variance(before) / len(before))


def bracketed_loss(times_path: str, attempt: int, onset: int, stop: int) -> tuple[float, float] | None:
    """What a fault that ran [onset, stop) cost per step, with its SE, against the job's pace interpolated between
    a window before the onset (steps 5 to onset) and one after the stop (stop + 5 to the end): a linear drift of the
    host's load over the run cancels, which a window before alone cannot tell from the fault. The fault's window is
    its last 30 steps (at most stop - onset - 5), as the verdict's cost at stop - 1 is."""
    ms = step_medians(times_path, attempt)
    if ms is None:
        return None
    end = max(ms, default=0) + 1
    windows = [range(5, onset), range(max(onset + 5, stop - 30), stop), range(stop + 5, end)]
    before, during, after = ([ms[s] for s in w if s in ms] for w in windows)
    if min(len(before), len(during), len(after)) < 5:
        return None
    centre = [statistics.fmean(w) for w in windows]
    weight = (centre[1] - centre[0]) / (centre[2] - centre[0])  # of the window after, at the fault's centre
    pace = (1 - weight) * statistics.fmean(before) + weight * statistics.fmean(after)
    var = statistics.variance(during) / len(during) + (1 - weight) ** 2 * statistics.variance(before) / len(before)
    var += weight**2 * statistics.variance(after) / len(after)
    return statistics.fmean(during) - pace, math.sqrt(var)


def _intermittent_loss(ms: dict, onset: int, end: int, every: int, se: bool):
    def slow(s: int) -> bool:
        return s >= onset and (s - onset) % every == 0

    deltas = []
    for s in range(onset, end):
        near = [ms[t] for t in range(s - every + 1, s + every) if t in ms and t != s and not slow(t)]
        if slow(s) and s in ms and len(near) >= 2:
            deltas.append(ms[s] - statistics.median(near))
    if len(deltas) < 5:
        return None
    typical = statistics.median(deltas)
    if not se:
        return typical / every
    spread = 1.4826 * statistics.median(abs(d - typical) for d in deltas)
    return typical / every, 1.2533 * spread / math.sqrt(len(deltas)) / every


def noise_sigma(collector: Collector, job: str, steps) -> float:
    """Median over modules of the spread of log(self time / the module's median across ranks), in steps of a
    clean job: the real noise that tests/bench/detector_quality.py's simulator draws from (its sigma)."""
    spreads = []
    for step in steps:
        for m in get_json(f"{collector.url}/api/v1/jobs/{job}/modules?step={step}")["modules"]:
            ms = [v for v in m["ms_by_rank"].values() if v > 0.05]  # sub-50 µs modules are timer noise
            if len(ms) >= 3:
                med = statistics.median(ms)
                spreads.append(statistics.median(abs(math.log(v / med)) for v in ms) / 0.6745)
    return statistics.median(spreads) if spreads else float("nan")


def cells_judged(collector: Collector, job: str, steps) -> float:
    """Rank x module cells per step whose module's median self time clears the CPU clock's floors: the cells a
    false alarm could come from (a clean job of tiny modules tests the step-level causes alone)."""
    floors = params_for_clock(DetectorParams(), cpu_clock=True)
    stored = get_json(f"{collector.url}/api/v1/jobs/{job}/steps?last=1000")["steps"]
    walls = {s["step"]: statistics.median(r["wall_ms"] for r in s["ranks"]) for s in stored if s["ranks"]}
    counts = []
    for step in steps:
        floor = floors.excess_floor(walls.get(step, 0.0))
        modules = get_json(f"{collector.url}/api/v1/jobs/{job}/modules?step={step}")["modules"]
        clear = [m["ms_by_rank"] for m in modules if statistics.median(m["ms_by_rank"].values()) >= floor]
        counts.append(sum(map(len, clear)))
    return statistics.mean(counts) if counts else 0.0


def judge(collector: Collector, job: str, wrap: str, shape: Shape, position: str, ranks: int, workdir: str) -> Result:
    culprit = culprit_rank(position, ranks)
    res = Result(wrap, shape.name, culprit, ranks)
    out, times = run_job(collector, job, wrap, shape, culprit, ranks, workdir)
    attempt = 1 if shape.restart else 0
    if out.returncode != 0 or not collector.wait_evaluated(job, shape.steps - 1, attempt):
        res.ok_run = False
        errors = [line for line in out.stderr.splitlines() if "Error" in line or "error:" in line]
        res.detail = f"rc {out.returncode}: " + " | ".join(errors[-4:] or [out.stderr[-600:]])
        return res
    verdicts = get_json(f"{collector.url}/api/v1/jobs/{job}/stragglers")["stragglers"]
    res.verdicts = verdicts
    if shape.clean:
        res.false_alarms = len(verdicts)
        res.clean_steps = shape.steps
        res.named = not verdicts
        sigma = noise_sigma(collector, job, range(shape.steps - 20, shape.steps))
        res.cells_judged = cells_judged(collector, job, range(shape.steps - 20, shape.steps))
        res.detail = f"{res.cells_judged:.0f} cells judged per step; module noise sigma {sigma:.3f} (log self time)"
        return res
    if shape.restart:
        first = get_json(f"{collector.url}/api/v1/jobs/{job}/steps?last=1000&attempt=0")["steps"]
        second = get_json(f"{collector.url}/api/v1/jobs/{job}/steps?last=1000")["steps"]
        res.attempt_ok = (
            [s["step"] for s in first] == list(range(len(first)))
            and len(first) >= 8
            and [s["step"] for s in second] == list(range(shape.steps))
        )
    return score(res, shape, verdicts, times, attempt)


def score(
    res: Result, shape: Shape, verdicts: list[dict], times: str, attempt: int, bracket_stop: int | None = None
) -> Result:
    """Named right, victims, latency and cost against the job's own step times, from the verdicts; bracket_stop:
    the fault ended there and the verdicts are as they stood the step before, the truth bracketed (bracketed_loss)."""
    culprit = res.culprit
    # A verdict over before the onset is on the job's clean steps: a false alarm there, whatever its rank.
    early = [v for v in verdicts if v["last_step"] < shape.onset]
    res.false_alarms, res.clean_steps = len(early), max(shape.onset - CPU_CLOCK_WARMUP, 0)
    verdicts = [v for v in verdicts if v["last_step"] >= shape.onset]
    res.verdicts = verdicts
    mine = [v for v in verdicts if v["rank"] == culprit]
    res.victims = sum(1 for v in verdicts if v["rank"] != culprit)
    if len(mine) != 1:
        res.detail = f"{len(mine)} verdicts on the culprit"
        return res
    v = mine[0]
    listed = {(e["module"].split(".", 1)[-1], e["phase"]) for e in v["modules"]}
    modules_ok = all((m, shape.phase) in listed for m in shape.modules)
    modules_ok &= not any(m in shape.not_listed for m, _ in listed)
    cause_ok = shape.cause is None or shape.cause in v["cause"]
    state_ok = (v["state"] == "resolved") if shape.stops_at is not None else (v["state"] == "active")
    res.latency = v["first_step"] - shape.onset
    res.named = modules_ok and cause_ok and state_ok and res.attempt_ok is not False
    res.detail = f"cause {v['cause']!r}, {len(v['modules'])} listed, state {v['state']}"
    if early:
        res.detail += f"; {len(early)} verdict(s) before the onset: " + ", ".join(
            f"rank {e['rank']} {e['cause']!r} steps {e['first_step']}-{e['last_step']}" for e in early
        )
    if shape.stops_at is None:
        res.cost = v["cost_ms_per_step"]
        every = int(shape.args[shape.args.index("--slow-every") + 1]) if "--slow-every" in shape.args else 1
        if bracket_stop is not None:
            measured = bracketed_loss(times, attempt, shape.onset, bracket_stop)
        else:
            measured = measured_loss(times, attempt, shape.onset, None, every, se=True)
        if isinstance(measured, tuple):
            res.measured, res.measured_se = measured
        if res.measured and res.measured > 0:
            res.cost_error = (res.cost - res.measured) / res.measured
    return res


def print_row(r: Result) -> None:
    cost = f"{r.cost:6.1f}" if r.cost is not None else "     -"
    measured = f"{r.measured:6.1f}" if r.measured is not None else "     -"
    measured += f" ±{r.measured_se:4.1f}" if r.measured_se is not None else "      "
    error = f"{100 * r.cost_error:+5.0f}%" if r.cost_error is not None else "     -"
    latency = str(r.latency) if r.latency is not None else "-"
    named = "yes" if r.named else ("RUN FAILED" if not r.ok_run else "NO")
    print(
        f"{r.wrap:6} {r.shape:9} r{r.culprit}/{r.ranks}  named {named:4} victims {r.victims}  "
        f"latency {latency:>3}  cost {cost} vs {measured} ms/step {error}  {r.detail}",
        flush=True,
    )


def markdown_row(r: Result) -> str:
    """The README's table row of a result."""
    named = "yes" if r.named else ("run failed" if not r.ok_run else f"**no** ({r.detail})")
    latency = str(r.latency) if r.latency is not None else "–"
    if r.cost is not None and r.measured is not None:
        cost = f"{r.cost:.1f} / {r.measured:.1f}" + (f" ± {r.measured_se:.1f}" if r.measured_se is not None else "")
    else:
        cost = "–"
    error = f"{100 * r.cost_error:+.0f} %" if r.cost_error is not None else "–"
    culprit = f"none ({r.ranks} ranks)" if r.shape == "clean" else f"rank {r.culprit} of {r.ranks}"
    cells = [r.wrap, r.shape, culprit, named, str(r.victims), latency, cost, error]
    return "| " + " | ".join(cells) + " |"


def totals(results: list[Result]) -> dict:
    faults = [r for r in results if r.shape != "clean" and r.ok_run]
    clean = [r for r in results if r.shape == "clean" and r.ok_run]
    found = [r for r in faults if r.named]
    reports = sum(1 for r in faults for v in r.verdicts) + sum(r.false_alarms for r in results if r.ok_run)
    right = sum(1 for r in faults for v in r.verdicts if v["rank"] == r.culprit)
    errors = sorted(abs(r.cost_error) for r in faults if r.cost_error is not None)
    latencies = [r.latency for r in faults if r.latency is not None]
    # costs further from the measured loss than twice its own standard error (the truth's noise, not drift)
    beyond = [r for r in faults if r.cost_error is not None and r.measured_se is not None]
    outside = sum(abs(r.cost - r.measured) > 2 * r.measured_se for r in beyond)
    clean_steps = sum(r.clean_steps for r in clean + faults)
    false_alarms = sum(r.false_alarms for r in clean + faults)
    return {
        "scenarios": len(results),
        "failed_runs": sum(not r.ok_run for r in results),
        "recall": len(found) / len(faults) if faults else float("nan"),
        "precision": right / reports if reports else float("nan"),
        "victims": sum(r.victims for r in faults),
        "false_alarms_per_1000_clean_steps": 1000 * false_alarms / clean_steps if clean_steps else float("nan"),
        "false_alarms": f"{false_alarms} in {clean_steps} clean steps",
        "median_abs_cost_error": statistics.median(errors) if errors else float("nan"),
        "worst_abs_cost_error": errors[-1] if errors else float("nan"),
        "max_latency": max(latencies) if latencies else None,
        "costs_beyond_2se": f"{outside} of {len(beyond)}",
    }


def print_totals(results: list[Result]) -> None:
    t = totals(results)
    print(
        f"\n{t['scenarios']} scenarios ({t['failed_runs']} runs failed): recall {t['recall']:.3f}, precision "
        f"{t['precision']:.3f}, victims blamed {t['victims']}, false alarms per 1000 clean steps "
        f"{t['false_alarms_per_1000_clean_steps']:.1f} ({t['false_alarms']}), |cost error| median "
        f"{100 * t['median_abs_cost_error']:.0f}% worst {100 * t['worst_abs_cost_error']:.0f}%, "
        f"latency max {t['max_latency']} steps, costs beyond 2 SE of the measured loss {t['costs_beyond_2se']}",
        flush=True,
    )


def run_matrix(
    wraps, shapes, culprits, ranks: int, results_path: str | None = None, keep: str | None = None
) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="modtrack-scenarios-") as tmp:
        workdir = keep or tmp
        os.makedirs(workdir, exist_ok=True)
        collector = Collector(workdir)
        try:
            for wrap in wraps:
                for name in shapes:
                    for position in culprits:
                        shape = SHAPES[name]
                        if shape.clean and position != culprits[0]:
                            continue  # a clean job has no culprit
                        job = f"{wrap}-{name}-{position}-{os.getpid()}"
                        if shape.onset != ONSET:
                            job += f"-o{shape.onset}"  # --rejudge reads the onset back from the name
                        r = judge(collector, job, wrap, shape, position, ranks, workdir)
                        print_row(r)
                        results.append(r)
                        if results_path:
                            with open(results_path, "a") as f:
                                f.write(json.dumps(asdict(r)) + "\n")
        finally:
            collector.stop()
    return results


def rejudge(folders: list[str], stop_at: int | None = None) -> list[Result]:
    """Judge the jobs kept by --keep again with today's detector, offline: their stored steps (replayed as the
    merge built them, with their stored collective waits taken out as the evaluator does) and their own step
    times. Whatever the agent measured stays what it was. stop_at: the jobs ran with --stop-at; each verdict is
    taken as it stood at stop_at - 1 and its cost against the bracketed truth."""
    from harness import replay

    results = []
    for folder in folders:
        for times in sorted(f for f in os.listdir(folder) if f.endswith(".times.jsonl")):
            job = times.removesuffix(".times.jsonl")
            wrap, name, position, *rest = job.split("-")
            shape = SHAPES[name]
            onset = [int(part[1:]) for part in rest[1:] if part.startswith("o") and part[1:].isdigit()]
            if onset:
                shape = replace(shape, onset=onset[0])
            ranks = replay.world_size(folder, job)
            res = Result(wrap, name, culprit_rank(position, ranks), ranks)
            attempt = 1 if shape.restart else 0
            matrices = replay.stored_matrices(folder, job, attempt)
            bracket = stop_at if stop_at is not None and not shape.clean and "--slow-every" not in shape.args else None
            episodes = replay.judge([m for m in matrices if bracket is None or m.step < bracket])
            verdicts = [asdict(ep) for ep in episodes]
            if shape.clean:
                res.verdicts, res.false_alarms, res.clean_steps, res.named = (
                    verdicts,
                    len(verdicts),
                    len(matrices),
                    not verdicts,
                )
            else:
                if bracket is not None:
                    shape = replace(shape, stops_at=None)
                res = score(res, shape, verdicts, os.path.join(folder, times), attempt, bracket)
            print_row(res)
            results.append(res)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wraps", default=",".join(WRAPS))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--culprits", default=",".join(CULPRITS))
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument(
        "--steps",
        type=int,
        help="run this many steps (the onset stays where it is: 15, or --onset) instead of the shape's",
    )
    ap.add_argument(
        "--onset",
        type=int,
        help="the first slow step of the persistent shapes, instead of 15: the truth's window before the onset, and "
        "the detector's baseline, then hold onset - 5 steps (the job's name carries it, for --rejudge)",
    )
    ap.add_argument(
        "--stop-at",
        type=int,
        help="every fault ends at this step: its verdict must resolve (as `stop`); with --rejudge: each verdict as it "
        "stood the step before, its cost against the loss bracketed by windows before the onset and after the stop",
    )
    ap.add_argument("--results", help="append each result to this JSON-lines file")
    ap.add_argument("--report", help="print the table and totals of a results file, run nothing")
    ap.add_argument("--keep", help="keep the collector's data (SQLite) and step times in this folder, for replay")
    ap.add_argument("--rejudge", nargs="+", help="judge the jobs kept in these folders again, offline, run nothing")
    ap.add_argument("--markdown", action="store_true", help="with --report or --rejudge: the README's table rows too")
    ap.add_argument(
        "--model",
        help="examples/train.py's model arguments for every job on top of the default tiny GPT's, or 'wide' (WIDE: "
        "modules of 1-5 ms, which clear the CPU clock's 1 ms floor; the default's mostly do not)",
    )
    ap.add_argument(
        "--agent-env",
        default="",
        help="agent settings for every job, e.g. MODTRACK_CLOCK=wall,MODTRACK_COLLECTIVES=on",
    )
    a = ap.parse_args(argv)
    AGENT_ENV.update(kv.split("=", 1) for kv in a.agent_env.split(",") if kv)
    if a.model:
        MODEL[:] = MODEL + (list(WIDE) if a.model == "wide" else a.model.split())  # argparse: the last flag wins
    for name, shape in SHAPES.items():
        fixed = shape.stops_at is not None or shape.restart or "--slow-every" in shape.args  # their steps are set
        SHAPES[name] = replace(
            shape,
            onset=a.onset if a.onset and not fixed else shape.onset,
            steps=a.steps or shape.steps,
            args=shape.args + (["--slow-to-step", str(a.stop_at)] if a.stop_at and not shape.clean else []),
            stops_at=a.stop_at if a.stop_at and not shape.clean else shape.stops_at,
        )
    if a.rejudge:
        results = rejudge(a.rejudge, a.stop_at)
    elif a.report:
        with open(a.report) as f:
            results = [Result(**json.loads(line)) for line in f]
        for r in results:
            print_row(r)
    else:
        results = run_matrix(a.wraps.split(","), a.shapes.split(","), a.culprits.split(","), a.ranks, a.results, a.keep)
    if a.markdown:
        for r in results:
            print(markdown_row(r))
    print_totals(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
