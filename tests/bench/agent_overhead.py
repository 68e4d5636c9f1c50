"""What tracking costs a training step: plain vs the seed ModuleTracker vs modtrack.

One thread, one fresh process per (model, mode), several rounds interleaved so that machine noise
hits every mode alike. Prints median step ms and the overhead per module call, and the ratio
modtrack / seed on MLP-200 (target <= 0.5) and modtrack's share of the Transformer step (target
<= 1 %).

    python tests/bench/agent_overhead.py [--rounds 5] [--steps 60] [--baseline-tree DIR]

It also prints what keeping the rank's position (agent/position.py, for hung jobs) costs per module
call, timed in the same processes; --baseline-tree DIR (an older checkout) adds a mode "baseline":
modtrack as DIR has it, interleaved with the others.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("plain", "seed", "modtrack")
BASELINE_SHIM = os.path.join(tempfile.gettempdir(), f"modtrack-bench-baseline-{os.getuid()}")
MODELS = ("mlp200", "transformer")


def build(model: str):
    import torch
    from torch import nn

    if model == "mlp200":
        net = nn.Sequential(*[m for _ in range(200) for m in (nn.Linear(64, 64), nn.ReLU())])
        x = torch.randn(32, 64)
    else:

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                layer = nn.TransformerEncoderLayer(256, 4, batch_first=True)
                self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
                self.head = nn.Linear(256, 10)

            def forward(self, x):
                return self.head(self.encoder(x))

        net = Encoder()
        x = torch.randn(8, 128, 256)
    return net, x


def child(model: str, mode: str, steps: int, warmup: int, cpu_time: bool, device: str = "cpu") -> dict:
    """Runs in its own process: time `steps` training steps, return median ms and calls/step."""
    import contextlib

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net, x = build(model)
    net, x = net.to(device), x.to(device)
    cuda = device.startswith("cuda")
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    calls = [0]

    def count(mod, args):
        calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    net(x).sum().backward()
    handle.remove()
    if mode == "seed":
        from torch.utils.module_tracker import ModuleTracker as Tracker
    elif mode == "modtrack":
        sys.path.insert(0, ROOT)
        from modtrack.agent import ModuleTracker as Tracker
    elif mode == "baseline":
        sys.path.insert(0, BASELINE_SHIM)
        from modtrack.agent import ModuleTracker as Tracker
    ctx = contextlib.nullcontext() if mode == "plain" else Tracker()
    # CPU time of this (only) thread: other processes on a shared machine do not inflate it.
    clock = time.thread_time if cpu_time and not cuda else time.perf_counter
    times = []
    with ctx:
        for i in range(warmup + steps):
            t0 = clock()
            opt.zero_grad(set_to_none=True)
            net(x).sum().backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()  # the step's GPU work is part of the step
            if i >= warmup:
                times.append(clock() - t0)
    out = {"median_ms": statistics.median(times) * 1e3, "calls": calls[0]}
    if mode == "modtrack":
        out["position_ns_per_call"] = position_cost_ns()
    return out


def position_cost_ns() -> float:
    """The position writes the tracker's hooks add to one module call (pre + post hook, as in
    agent/tracker.py), timed alone: best of 5 runs of 200,000."""
    import timeit

    from modtrack.agent.position import Position

    setup = "p = Position(); mid = 7; row = [7, 0]; stack = [(0, [3, 0])]"
    body = (
        "position = p; position.module = mid; position.phase = row[1]\n"
        "position = p\nif stack:\n    caller = stack[-1][1]; position.module = caller[0]; position.phase = caller[1]"
    )
    empty = timeit.repeat("pass", setup, repeat=5, number=200_000, globals={"Position": Position})
    timed = timeit.repeat(body, setup, repeat=5, number=200_000, globals={"Position": Position})
    return (min(timed) - min(empty)) / 200_000 * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per process (MLP-200)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--wall", action="store_true", help="time steps by wall clock, not thread CPU time")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (then steps are timed by wall clock)")
    ap.add_argument("--baseline-tree", help="a checkout of an older modtrack: adds the mode 'baseline'")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(
            json.dumps(
                child(args.child[0], args.child[1], args.steps, warmup=5, cpu_time=not args.wall, device=args.device)
            )
        )
        return
    modes = MODES
    if args.baseline_tree:
        make_baseline_shim(os.path.abspath(args.baseline_tree))
        modes = (*MODES, "baseline")
    results: dict = {}
    for r in range(args.rounds):
        for model in args.models.split(","):
            steps = args.steps if model == "mlp200" else max(5, args.steps // 4)
            for mode in modes:
                out = subprocess.run(
                    [sys.executable, __file__, "--steps", str(steps), "--child", model, mode]
                    + (["--wall"] if args.wall else [])
                    + ["--device", args.device],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                res = json.loads(out.strip().splitlines()[-1])
                results.setdefault((model, mode), []).append(res["median_ms"])
                results[(model, "calls")] = res["calls"]
                if "position_ns_per_call" in res:
                    results.setdefault("position_ns", []).append(res["position_ns_per_call"])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    timer = "wall" if args.wall or args.device != "cpu" else "thread CPU"
    print(f"device {args.device}; step time: median {timer} time, median over {args.rounds} rounds")
    print(f"{'model':<12} {'mode':<9} {'step ms':>9} {'overhead ms':>12} {'us/call':>8}  (calls/step)")
    for model in args.models.split(","):
        plain = statistics.median(results[(model, "plain")])
        calls = results[(model, "calls")]
        over = {}
        for mode in modes:
            med = statistics.median(results[(model, mode)])
            over[mode] = med - plain
            print(f"{model:<12} {mode:<9} {med:9.2f} {over[mode]:12.2f} {over[mode] * 1e3 / calls:8.1f}  ({calls})")
        if over["seed"] > 0:
            print(f"{model}: modtrack/seed overhead ratio = {over['modtrack'] / over['seed']:.2f}")
        print(f"{model}: modtrack overhead = {100 * over['modtrack'] / plain:.2f} % of the plain step")
        runs = results[(model, "modtrack")]
        spread = (max(runs) - min(runs)) / statistics.median(runs) * 100 if len(runs) > 1 else float("nan")
        position_ms = statistics.median(results["position_ns"]) * calls / 1e6
        print(
            f"{model}: position updates {statistics.median(results['position_ns']):.0f} ns/call = "
            f"{position_ms:.3f} ms/step = {100 * position_ms / plain:.2f} % of the plain step "
            f"(modtrack's step varies {spread:.1f} % from round to round)"
        )
        if "baseline" in modes:
            base = statistics.median(results[(model, "baseline")])
            now = statistics.median(results[(model, "modtrack")])
            print(
                f"{model}: modtrack - baseline = {now - base:+.3f} ms/step ({100 * (now - base) / plain:+.2f} % "
                "of the plain step)"
            )


def make_baseline_shim(tree: str) -> None:
    """BASELINE_SHIM/modtrack/{agent,collector,protos} -> the baseline checkout's folders."""
    import shutil

    shutil.rmtree(BASELINE_SHIM, ignore_errors=True)
    os.makedirs(os.path.join(BASELINE_SHIM, "modtrack"))
    for part in ("agent", "collector", "protos"):
        os.symlink(os.path.join(tree, part), os.path.join(BASELINE_SHIM, "modtrack", part))


if __name__ == "__main__":
    main()
