"""Detection quality on simulated jobs, side by side with the usual rank-level approach.

Many simulated runs (in-process, the detector fed directly) with random stragglers (one rank or
a whole host; one module and phase, or every module for a fifth of them; 1.05-2x; random onset
and length) separated by clean stretches. Runs mix 2 to 64 ranks, 10 to 60 modules, DDP and
two-stage pipelines. The baseline is the common per-rank check: each rank's median compute time over a
window, score = fastest rank's median / this rank's median, flagged below 0.75.

    python tests/bench/detector_quality.py            # full: 300 runs
    python tests/bench/detector_quality.py --quick    # what CI asserts (tests/test_detection_quality.py)
    python tests/bench/detector_quality.py --runs 100 --verbose   # ... and why each wrong report was made
    python tests/bench/detector_quality.py --noise-from DIR...    # ... also with the noise of real jobs

--noise-from takes folders the scenario benchmark kept (`tests/bench/scenarios.py --keep DIR`): the noise of
their steps with no straggler (a clean job's from step 5, the others' steps 5-14, before the onset at 15) is
measured (collector/sim/calibration.py) and the same runs are simulated again drawing from it, judged with
the detector's parameters for jobs timed on the CPU clock, where that noise comes from (its floors: 1 ms and
1 % of the step), and the simulator's own noise under those parameters too, to tell the floors from the noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modtrack.collector.pipeline.detector import (
    Z_SCALE,
    Detector,
    DetectorParams,
    column_stats,
    flag_step,
    params_for_clock,
)
from modtrack.collector.sim.calibration import MeasuredNoise, measure_noise
from modtrack.collector.sim.cluster_model import ClusterModel, Straggler

BASELINE_WINDOW = 20
ONSET = 15  # the scenario benchmark's stragglers start here (tests/bench/scenarios.py)
BASELINE_THRESHOLD = 0.75


@dataclass
class Found:
    """One report of either method: who, where (None at rank level), from which step."""

    ranks: set[int]
    column: int | None
    first_step: int
    episode: object = None  # the detector's Episode (None for the baseline), for --verbose


@dataclass
class Tally:
    reports: int = 0
    true_reports: int = 0
    victims: int = 0  # reports naming a rank that is not slow while a straggler is on
    false_alarms: int = 0  # reports opened while nothing is slow
    clean_steps: int = 0
    by_ranks: dict = field(default_factory=dict)  # ranks -> [false alarms, clean steps]
    stragglers_13: int = 0  # injected at >= 1.3x
    found_13: int = 0
    found_by_bucket: dict = field(default_factory=dict)  # slowdown bucket -> [found, injected]
    latencies: list = field(default_factory=list)  # steps from onset, detections at >= 1.3x
    where_right: int = 0
    where_known: int = 0


def random_run(rng: np.random.Generator, steps: int, measured: MeasuredNoise | None = None) -> ClusterModel:
    ranks = int(rng.choice([2, 8, 16, 32, 64]))
    model = ClusterModel(
        ranks=ranks,
        ranks_per_host=min(8, ranks),
        modules=int(rng.integers(10, 60)),
        stages=2 if ranks >= 16 and rng.random() < 0.3 else 1,
        sigma=float(rng.uniform(0.02, 0.05)),
        seed=int(rng.integers(1 << 31)),
        measured=measured,
    )
    t = int(rng.integers(20, 60))
    while True:
        length = int(rng.integers(30, 100))
        if t + length > steps - 10:
            break
        # A whole host only where it is a minority of its stage (peers to compare with).
        host_level = ranks // model.stages >= 4 * model.ranks_per_host and rng.random() < 0.25
        rank = int(rng.integers(ranks))
        if host_level:
            who, host_name = model.host_ranks(model.hosts[rank]), model.hosts[rank]
        else:
            who, host_name = [rank], None
        runs = np.nonzero(~np.isnan(model.mask[rank, : model.modules]))[0]  # its stage's modules
        whole_rank = rng.random() < 0.2  # every module slow: what a rank-level check can see
        model.stragglers.append(
            Straggler(
                who,
                module=-1 if whole_rank else int(rng.choice(runs)),
                phase=int(rng.integers(1, 3)),
                slowdown=float(rng.uniform(1.05, 2.0)),
                onset=t,
                end=t + length,
                host=host_name,
            )
        )
        t += length + int(rng.integers(30, 80))  # a clean stretch
    return model


def detector_reports(model: ClusterModel, matrices, params: DetectorParams) -> list[Found]:
    det = Detector("sim", params)
    seen = {}
    for m in matrices:
        for ep in det.observe(m):
            seen[id(ep)] = ep
    found = []
    for ep in seen.values():
        ranks = set(ep.ranks) if ep.rank == -1 else {ep.rank}
        module = int(ep.module.rsplit(".", 1)[1])
        column = model.column(module, 1 if ep.phase == "forward" else 2)
        found.append(Found(ranks, column, ep.first_step, ep))
    return found


def baseline_reports(matrices) -> list[Found]:
    """Rank level: median compute over a window, min-median / rank-median < 0.75."""
    compute = np.array([m.wall_ms - m.sync_wait_ms for m in matrices])  # (steps, R)
    found, open_since = [], {}
    for s in range(BASELINE_WINDOW, len(compute) + 1):
        med = np.median(compute[s - BASELINE_WINDOW : s], axis=0)
        slow = set(np.nonzero(med.min() / med < BASELINE_THRESHOLD)[0].tolist())
        for r in slow - set(open_since):
            open_since[r] = s - 1
            found.append(Found({r}, None, s - 1))
        for r in set(open_since) - slow:
            del open_since[r]
    return found


def score(model: ClusterModel, found: list[Found], steps: int, n: int, t: Tally) -> list[tuple[str, Found]]:
    """Add a run's reports to the tally; return its wrong ones as ("false alarm" | "victim", report)."""
    wrong = []
    active_at = np.full(steps, -1)
    for i, s in enumerate(model.stragglers):
        active_at[s.onset : min(s.end + n, steps)] = i  # episodes may still open just after the end
    t.clean_steps += int((active_at == -1).sum())
    per = t.by_ranks.setdefault(model.ranks, [0, 0])
    per[1] += int((active_at == -1).sum())
    for f in found:
        t.reports += 1
        i = active_at[f.first_step]
        if i == -1:
            t.false_alarms += 1
            per[0] += 1
            wrong.append(("false alarm", f))
        elif f.ranks & set(model.stragglers[i].ranks):
            t.true_reports += 1
        else:
            t.victims += 1
            wrong.append(("victim", f))
    for i, s in enumerate(model.stragglers):
        hits = [f for f in found if active_at[f.first_step] == i and f.ranks & set(s.ranks)]
        bucket = min(int((s.slowdown - 1.0) * 10), 9)  # 1.0-1.1, 1.1-1.2, ...
        b = t.found_by_bucket.setdefault(bucket, [0, 0])
        b[1] += 1
        b[0] += bool(hits)
        if s.slowdown >= 1.3:
            t.stragglers_13 += 1
            if hits:
                t.found_13 += 1
                first = min(hits, key=lambda f: f.first_step)
                t.latencies.append(first.first_step - s.onset)
        for f in hits:
            if f.column is not None and s.module >= 0:
                t.where_known += 1
                t.where_right += f.column == model.column(s.module, s.phase)
    return wrong


def explain(run: int, model: ClusterModel, matrices, params: DetectorParams, kind: str, f: Found) -> None:
    """Print a wrong report and, for the n steps up to its opening, the figures behind each flag."""
    ep = f.episode
    print(
        f"{kind}: run {run} (model seed {model.seed}, {model.ranks} ranks, {model.modules} modules, "
        f"{model.stages} stage(s), sigma {model.sigma:.3f}) step {ep.first_step}-{ep.last_step} "
        f"rank {ep.rank} host {ep.host} ranks {ep.ranks} column {f.column} ({ep.module} {ep.phase}) "
        f"slowdown {ep.slowdown:.3f} cost {ep.cost_ms_per_step:.3f} ms"
    )
    for s in model.stragglers:
        print(
            f"  injected: ranks {s.ranks} module {s.module} phase {s.phase} x{s.slowdown:.2f} steps {s.onset}-{s.end}"
        )
    col = f.column
    for step in range(max(ep.first_step - params.n + 1, 0), ep.first_step + 1):
        m = matrices[step]
        flags = flag_step(m, params)
        count, median, mad = column_stats(np.asarray(m.self_ms, dtype=np.float64)[:, col : col + 1])
        mad_f = max(mad[0], params.mad_floor_frac * median[0], params.mad_floor_ms)
        wait = np.nan_to_num(np.asarray(m.sync_wait_ms, dtype=np.float64))
        for r in sorted(f.ranks):
            x = float(m.self_ms[r, col])
            print(
                f"  step {step} rank {r}: self {x:.4f} ms, median {median[0]:.4f} (ratio {x / median[0]:.3f}), "
                f"MAD {mad[0]:.4f} (floored {mad_f:.4f}), z {Z_SCALE * (x - median[0]) / mad_f:.2f}, "
                f"n {count[0]}, wait {wait[r]:.3f} vs median {np.median(wait):.3f}, "
                f"flagged {bool(flags.flagged[r, col])}"
            )


def evaluate(
    runs: int,
    steps: int,
    seed: int,
    verbose: bool = False,
    measured: MeasuredNoise | None = None,
    cpu_clock: bool | None = None,
) -> dict[str, dict]:
    """The same runs (by seed) with the simulator's noise, or with `measured` noise; judged with the detector's
    params for CPU-clocked jobs (their floors) where `cpu_clock`, by default where the noise is measured."""
    rng = np.random.default_rng(seed)
    cpu_clock = measured is not None if cpu_clock is None else cpu_clock
    params = params_for_clock(DetectorParams(), cpu_clock=True) if cpu_clock else DetectorParams()
    tallies = {"modtrack": Tally(), "baseline": Tally()}
    for run in range(runs):
        model = random_run(rng, steps, measured)
        matrices = [model.step(s) for s in range(steps)]
        wrong = score(model, detector_reports(model, matrices, params), steps, params.n, tallies["modtrack"])
        for kind, f in wrong if verbose else []:
            explain(run, model, matrices, params, kind, f)
        score(model, baseline_reports(matrices), steps, params.n, tallies["baseline"])
    return {name: summarize(t) for name, t in tallies.items()}


def summarize(t: Tally) -> dict:
    lat = np.array(t.latencies) if t.latencies else np.array([np.nan])
    return {
        "precision": t.true_reports / t.reports if t.reports else float("nan"),
        "recall_ge_1.3x": t.found_13 / t.stragglers_13 if t.stragglers_13 else float("nan"),
        "latency_p50": float(np.percentile(lat, 50)),
        "latency_p90": float(np.percentile(lat, 90)),
        "victims_blamed": t.victims,
        "false_alarms_per_1000_clean": 1000.0 * t.false_alarms / max(t.clean_steps, 1),
        "module_phase_right": t.where_right / t.where_known if t.where_known else float("nan"),
        "recall_by_slowdown": {
            f"{1 + b / 10:.1f}-{1.1 + b / 10:.1f}x": f"{v[0]}/{v[1]}" for b, v in sorted(t.found_by_bucket.items())
        },
        "stragglers_ge_1.3x": t.stragglers_13,
        "reports": t.reports,
        "clean_steps": t.clean_steps,
        "false_alarms_per_1000_clean_by_ranks": {
            f"{r} ranks": f"{1000.0 * fa / max(clean, 1):.2f}" for r, (fa, clean) in sorted(t.by_ranks.items())
        },
    }


def real_noise(folders: list[str]) -> MeasuredNoise:
    """The noise of the kept scenario jobs' steps with no straggler (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared harness
    from harness import replay
    from modtrack.collector.store.sqlite import Store

    clean = []
    for folder in folders:
        store = Store(folder)
        try:
            jobs = [row["job"] for row in store.jobs()]
        finally:
            store.close()
        for job in jobs:
            last = None if "clean" in job else ONSET
            clean += [m for m in replay.stored_matrices(folder, job) if 5 <= m.step and (last is None or m.step < last)]
    return measure_noise(clean)


def print_table(results: dict[str, dict]) -> None:
    names = list(results)
    nested = ("recall_by_slowdown", "false_alarms_per_1000_clean_by_ranks")
    rows = [k for k in results[names[0]] if k not in nested]
    width = max(14, *(len(n) + 1 for n in names))
    print(f"{'metric':30s}" + "".join(f"{n:>{width}s}" for n in names))
    for k in rows:
        cells = []
        for n in names:
            v = results[n][k]
            cells.append(f"{v:{width}.3f}" if isinstance(v, float) else f"{v!s:>{width}s}")
        print(f"{k:30s}" + "".join(cells))
    titles = ("recall by slowdown (found/injected):", "false alarms per 1,000 clean steps, by ranks:")
    for key, title in zip(nested, titles):
        print(title)
        for bucket in results[names[0]][key]:
            print(f"  {bucket:28s}" + "".join(f"{results[n][key].get(bucket, '-'):>{width}s}" for n in names))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 runs of 400 steps (the CI test)")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--verbose",
        action="store_true",
        help="print every wrong modtrack report (false alarm, victim) with the figures behind it",
    )
    ap.add_argument("--noise-from", nargs="+", metavar="DIR", help="also simulate with the noise of these kept jobs")
    a = ap.parse_args(argv)
    runs, steps = (40, 400) if a.quick else (a.runs, a.steps)
    t0 = time.perf_counter()
    results = evaluate(runs, steps, a.seed, a.verbose)
    if a.noise_from:
        measured = real_noise(a.noise_from)
        own = ClusterModel(ranks=3, ranks_per_host=3, modules=40, seed=a.seed, sigma=0.035)
        for name, noise in (
            ("the real jobs' clean steps", measured),
            ("the simulator's own (3 ranks, sigma 0.035)", measure_noise([own.step(s) for s in range(300)])),
        ):
            print(f"noise of {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in noise.summary().items()))
        floors = evaluate(runs, steps, a.seed, a.verbose, cpu_clock=True)
        real = evaluate(runs, steps, a.seed, a.verbose, measured)
        results = {
            "modtrack: sim noise": results["modtrack"],
            "sim noise, CPU floors": floors["modtrack"],
            "real noise, CPU floors": real["modtrack"],
            "baseline: sim noise": results["baseline"],
            "baseline: real noise": real["baseline"],
        }
    print(f"{runs} simulated runs x {steps} steps, seed {a.seed}, {time.perf_counter() - t0:.1f} s")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
