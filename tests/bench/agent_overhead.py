"""What tracking costs a training step: plain vs the seed ModuleTracker vs modtrack.

One thread, one fresh process per (model, mode), several rounds interleaved so that machine noise
hits every mode alike. Prints median step ms and the overhead per module call, and the ratio
modtrack / seed on MLP-200 (target <= 0.5) and modtrack's share of the Transformer step (target
<= 1 %).

    python tests/bench/agent_overhead.py [--rounds 5] [--steps 60]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("plain", "seed", "modtrack")
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
    return {"median_ms": statistics.median(times) * 1e3, "calls": calls[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per process (MLP-200)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--wall", action="store_true", help="time steps by wall clock, not thread CPU time")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (then steps are timed by wall clock)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps, warmup=5, cpu_time=not args.wall, device=args.device)))
        return
    results: dict = {}
    for r in range(args.rounds):
        for model in args.models.split(","):
            steps = args.steps if model == "mlp200" else max(5, args.steps // 4)
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--steps", str(steps), "--child", model, mode]
                                     + (["--wall"] if args.wall else []) + ["--device", args.device],
                                     check=True, capture_output=True, text=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                results.setdefault((model, mode), []).append(res["median_ms"])
                results[(model, "calls")] = res["calls"]
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    timer = "wall" if args.wall or args.device != "cpu" else "thread CPU"
    print(f"device {args.device}; step time: median {timer} time, median over {args.rounds} rounds")
    print(f"{'model':<12} {'mode':<9} {'step ms':>9} {'overhead ms':>12} {'us/call':>8}  (calls/step)")
    for model in args.models.split(","):
        plain = statistics.median(results[(model, "plain")])
        calls = results[(model, "calls")]
        over = {}
        for mode in MODES:
            med = statistics.median(results[(model, mode)])
            over[mode] = med - plain
            print(f"{model:<12} {mode:<9} {med:9.2f} {over[mode]:12.2f} {over[mode] * 1e3 / calls:8.1f}  ({calls})")
        if over["seed"] > 0:
            print(f"{model}: modtrack/seed overhead ratio = {over['modtrack'] / over['seed']:.2f}")
        print(f"{model}: modtrack overhead = {100 * over['modtrack'] / plain:.2f} % of the plain step")


if __name__ == "__main__":
    main()
