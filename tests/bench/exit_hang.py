"""The exit hang, counted: RUNS times a 2-rank gloo DDP job (tests/exit_train.py) that calls
destroy_process_group() and returns from main() with the DDP model alive, under the agent with a live
collector; each run is killed past --timeout and counted as a hang. On a
hang every rank's stacks (Python and native) are dumped with py-spy, when it is installed.

    python tests/bench/exit_hang.py [--runs 10] [--timeout 30] [--modes agent,none,baseline]
        [--baseline-path DIR] [--env K=V ...]

Modes, interleaved run by run: agent (this checkout's agent), none (plain torchrun), baseline (the agent of
another checkout: DIR/modtrack/agent, e.g. a `git archive` of an older commit).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the shared harness (tests/harness/)

from harness import torchrun  # noqa: E402
from harness.collector_process import CollectorProcess  # noqa: E402

SCRIPT = os.path.join(ROOT, "tests", "exit_train.py")


def dump_stacks(root_pid: int) -> str:
    """py-spy dump --native of every process under torchrun (the ranks)."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    out = []
    for pid in torchrun.descendants(root_pid):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ")
        except OSError:
            continue
        if "-m torch.distributed.run" in cmd or not cmd.startswith(sys.executable):
            continue
        dump = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True)
        out.append(f"=== pid {pid}: {cmd}\n{dump.stdout}{dump.stderr}")
    return "\n".join(out)


def run_once(collector, mode: str, args, extra_env: dict) -> tuple[str, float, str]:
    """One job: ("ok" | "hung" | "exit N", seconds, what to show)."""
    env = dict(extra_env)
    if mode == "baseline":  # the agent from another checkout (its modtrack package first on the path)
        env["PYTHONPATH"] = os.pathsep.join([args.baseline_path, ROOT, os.environ.get("PYTHONPATH", "")])
    launch = [] if mode == "none" else ["-m", "modtrack.agent", "--collector", collector.grpc_target]
    cmd = torchrun.torchrun_cmd(2, *launch, args.script, "--steps", str(args.steps), *args.script_args.split())
    proc = torchrun.start(cmd, extra_env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    begun = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=args.timeout)
        seconds = time.monotonic() - begun
        return ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), seconds, output[-6000:]
    except subprocess.TimeoutExpired:
        return "hung", time.monotonic() - begun, dump_stacks(proc.pid)
    finally:
        torchrun.end(proc)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10, help="runs per mode")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--modes", default="agent", help="comma-separated, interleaved: agent, none (plain torchrun), baseline"
    )
    parser.add_argument("--baseline-path", default="", help="for mode baseline: a dir holding an older modtrack/")
    parser.add_argument("--env", action="append", default=[], help="K=V for the ranks (e.g. MODTRACK_COLLECTIVES=on)")
    parser.add_argument("--script", default=SCRIPT, help="the job (default: tests/exit_train.py)")
    parser.add_argument("--script-args", default="", help="more arguments for it, in one string")
    parser.add_argument("--stacks", default="", help="append hung ranks' stacks to this file (default: print)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    outcomes: dict[str, list[str]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp, CollectorProcess(os.path.join(tmp, "data")) as collector:
        for i in range(args.runs):
            for mode in modes:
                outcome, seconds, detail = run_once(collector, mode, args, extra_env)
                outcomes[mode].append(outcome)
                print(f"run {i} {mode}: {outcome} {seconds:.1f} s", flush=True)
                if outcome == "ok":
                    continue
                if args.stacks:
                    with open(args.stacks, "a") as f:
                        f.write(f"##### run {i} {mode}: {outcome}\n{detail}\n")
                else:
                    print(detail, flush=True)
    for mode, seen in outcomes.items():
        others = [o for o in seen if o not in ("ok", "hung")]
        print(f"{mode}: HANGS {seen.count('hung')}/{len(seen)}, other failures {others or 'none'}", flush=True)


if __name__ == "__main__":
    main()
