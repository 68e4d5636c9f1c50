"""What collective timing costs a gloo training step (the Flight Recorder path; NCCL's hook needs a GPU).

torchrun, 2 ranks, tests/collectives_train.py (DDP, plus --extra small all-reduces a step so the Flight
Recorder's ring fills and every dump reads all of it) under the agent, streaming to a real collector.
Modes, one fresh job each, rounds interleaved: off (MODTRACK_COLLECTIVES=off)
and on (the Flight Recorder is dumped and read on the sender thread). Prints rank 0's median step time per
mode and round, and the ratio on / off.

    python tests/bench/collectives_cost.py [--rounds 3] [--steps 300] [--extra 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness.collector_process import REPO
from harness.collector_thread import CollectorThread
from harness.torchrun import run, torchrun_cmd

SCRIPT = os.path.join(REPO, "tests", "collectives_train.py")


def step_ms(target: str, mode: str, job: str, steps: int, extra: int) -> float:
    cmd = torchrun_cmd(2, "-m", "modtrack.agent", "--collector", target, "--job", job, SCRIPT)
    cmd += ["--late-ms", "0", "--steps", str(steps), "--extra", str(extra), "--print-step-ms"]
    done = run(cmd, timeout=300, extra_env={"MODTRACK_COLLECTIVES": mode})
    assert done.returncode == 0, done.stderr[-2000:]
    return float(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("STEP_MS")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--extra", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        collector = CollectorThread(tmp)
        try:
            results: dict[str, list[float]] = {"off": [], "on": []}
            for r in range(args.rounds):
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    ms = step_ms(collector.grpc_target, mode, f"cost-{mode}-{r}", args.steps, args.extra)
                    results[mode].append(ms)
                    print(f"round {r} {mode:4s} median step {ms:.3f} ms", flush=True)
            summary = collector.collector.ingest.collectives.summary(f"cost-on-{args.rounds - 1}")
            for g in summary["groups"]:
                per_step = g["collectives_per_step"]
                print(f"group {g['group']}: {per_step:.0f} collectives/step lined up over {g['steps']} steps")
        finally:
            collector.stop()
    auto, every = statistics.median(results["off"]), statistics.median(results["on"])
    print(f"median over rounds: off {auto:.3f} ms, on {every:.3f} ms, on/off {every / auto:.3f}")


if __name__ == "__main__":
    main()
