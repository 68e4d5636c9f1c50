"""The demo behind `make demo`: one collector, three CPU ranks, one straggler, the verdict.

Starts a collector on free local ports with a throw-away data directory, runs
examples/train.py under torchrun with 3 ranks and the agent, rank 2 slowed in one
block's backward from some step on, then asks the collector who is slow and prints it.
Three ranks and the onset at step 15, as the scenario benchmark runs its jobs: on a 2-core
machine 4 ranks made the job's own measure of its loss swing by more than the loss
(-22 to +103 ms per step for the same 60 ms fault), so it could not check the verdict.
Everything it started is stopped before it returns (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def wait_until_serving(url: str, collector: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if collector.poll() is not None:
            raise SystemExit(f"the collector exited with {collector.returncode}")
        try:
            get_json(url)
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the collector did not answer {url} within {timeout_s:.0f} s")


def wait_for_verdict(api: str, job: str, timeout_s: float) -> list[dict]:
    """The collector evaluates the last steps shortly after they arrive: poll for a little while."""
    deadline = time.monotonic() + timeout_s
    stragglers = []
    while time.monotonic() < deadline:
        stragglers = get_json(f"{api}/api/v1/jobs/{job}/stragglers")["stragglers"]
        if stragglers:
            return stragglers
        time.sleep(0.5)
    return stragglers


def describe(s: dict) -> str:
    until = "ongoing" if s["state"] == "active" else f"until step {s['last_step']}"
    where = ", ".join(f"{m['module']} ({m['phase']}) +{m['excess_ms']:.1f} ms" for m in s.get("modules", [])[:4])
    return (
        f"rank {s['rank']} on host {s['host']}: {s.get('cause') or 'slow'} since step {s['first_step']} ({until}): "
        f"{where or s['module']}; costing the job {s['cost_ms_per_step']:.1f} ms per step "
        f"({s.get('cost_pct', 0.0):.0f} % of its step time)"
    )


def measured_loss(times_path: str, onset: int, warmup: int = 5) -> tuple[float, float] | None:
    """The ranks' own step times (train.py --step-times): a step's time is the median over the ranks (on shared
    cores one rank's step boundary moves by tens of ms against its peers', while their sums agree); then the
    mean before the onset (after the first, slower steps) and over the last 30 steps, as the scenario benchmark
    takes them (a loss per step is a difference of means; this host's step times are often bimodal, and a median
    sits on one mode). Their difference is what the job lost per step, measured outside the collector."""
    by_step: dict[int, list[float]] = {}
    try:
        with open(times_path) as f:
            for r in map(json.loads, f):
                by_step.setdefault(r["step"], []).append(r["ms"])
    except OSError:
        return None
    ms = {step: statistics.median(values) for step, values in by_step.items()}
    last = max(ms, default=0)
    before = [v for step, v in ms.items() if warmup <= step < onset]
    after = [v for step, v in ms.items() if step >= max(onset + 2, last - 29)]  # the first slow steps fill the pipeline
    if len(before) < 3 or len(after) < 3:
        return None
    return statistics.fmean(before), statistics.fmean(after)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--slow-rank", type=int, default=2)
    p.add_argument("--slow-module", default="blocks.1.mlp")
    p.add_argument("--slow-phase", choices=("forward", "backward"), default="backward")
    p.add_argument("--slow-ms", type=float, default=60.0)
    p.add_argument("--slow-from-step", type=int, default=15)
    p.add_argument("--keep", action="store_true", help="keep the collector (and dashboard) up until Ctrl-C")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    api = f"http://{http_addr}"
    data_dir = tempfile.mkdtemp(prefix="modtrack-demo-")
    job = f"demo-{int(time.time())}"
    times_path = os.path.join(data_dir, "step-times.jsonl")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    collector = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modtrack.collector",
            "serve",
            "--grpc-addr",
            grpc_addr,
            "--http-addr",
            http_addr,
            "--data-dir",
            data_dir,
            "--log-level",
            "WARNING",
        ],
        env=env,
        cwd=REPO,
    )
    try:
        wait_until_serving(f"{api}/api/v1/jobs", collector)
        print(f"collector: gRPC {grpc_addr}, HTTP {api}, data in {data_dir}", flush=True)
        train = [
            "-m",
            "modtrack.agent",
            "--collector",
            grpc_addr,
            "--job",
            job,
            os.path.join(HERE, "train.py"),
            "--steps",
            str(args.steps),
            "--slow-rank",
            str(args.slow_rank),
            "--slow-module",
            args.slow_module,
            "--slow-phase",
            args.slow_phase,
            "--slow-ms",
            str(args.slow_ms),
            "--slow-from-step",
            str(args.slow_from_step),
            "--step-times",
            times_path,
        ]
        torchrun = ["--standalone", "--nproc-per-node", str(args.ranks), *train]
        print("$ torchrun " + shlex.join(torchrun), flush=True)
        print(
            f"(rank {args.slow_rank} is slowed by {args.slow_ms:g} ms in {args.slow_module} "
            f"{args.slow_phase} from step {args.slow_from_step} on)",
            flush=True,
        )
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", *torchrun], env=env, cwd=REPO, timeout=600
        )
        if result.returncode != 0:
            print(f"training exited with {result.returncode}", file=sys.stderr)
            return result.returncode
        stragglers = wait_for_verdict(api, job, timeout_s=15)
        stragglers.sort(key=lambda s: (s["state"] != "active", -s["cost_ms_per_step"]))
        print("\nverdict: " + (describe(stragglers[0]) if stragglers else "no straggler found"))
        if len(stragglers) > 1:
            print("also flagged:")
            for s in stragglers[1:]:
                print("  " + describe(s))
        measured = measured_loss(times_path, args.slow_from_step)
        if measured is not None:
            before, after = measured
            print(
                f"measured by the job itself (its ranks' step times, means): {before:.1f} ms per step before "
                f"step {args.slow_from_step}, {after:.1f} ms after: {after - before:.1f} ms per step lost"
            )
        print(f"\ndashboard: {api}/   (took {time.monotonic() - started:.0f} s)")
        if args.keep:
            print("collector kept running; Ctrl-C to stop it", flush=True)
            try:
                collector.wait()
            except KeyboardInterrupt:
                pass
        return 0 if stragglers else 1
    finally:
        collector.terminate()
        try:
            collector.wait(timeout=15)
        except subprocess.TimeoutExpired:
            collector.kill()
            collector.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
