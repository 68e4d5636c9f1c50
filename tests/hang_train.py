"""examples/train.py's TinyGPT under DDP, with a hang on demand (the stall tests and README run it).

    torchrun --nproc-per-node 3 -m modtrack.agent --collector HOST:PORT tests/hang_train.py \
        --hang-rank 1 --hang-in forward --hang-module blocks.1.mlp --hang-step 10

--hang-in forward|backward: the rank sleeps forever inside that module's forward, or inside its
backward (an autograd Function at the module's output); data: in its data loading, before the
step's first module; pause: every rank sleeps --pause-s after the optimizer step (a checkpoint),
then training goes on; slow: the rank runs that module's forward over and over for --pause-s (a
recurrent loop: slow, but moving), then training goes on. A sleep blocks in C code, as a collective
or a device wait would. --hang-in slow,pause does both: the slow rank at --hang-step, the pause after
--pause-step. --mark PATH: the hung rank writes the wall time its hang began there (the tests' truth
for how soon the verdict came); --step-s S: every step's data loading takes S seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from train import TinyGPT

FOREVER_S = 3600.0
MARK = {"path": ""}  # --mark


def hang_forever() -> None:
    if MARK["path"]:
        with open(MARK["path"], "w") as f:
            f.write(repr(time.time()))
    time.sleep(FOREVER_S)


def run_for(seconds: float, forward, *a, **kw):
    """A module's forward called again and again for `seconds` (a recurrent loop): slow, but moving."""
    end = time.monotonic() + seconds
    with torch.no_grad():  # the loop's outputs are not trained on: no graph for them
        while time.monotonic() < end:
            forward(*a, **kw)
            time.sleep(0.05)
    return forward(*a, **kw)


class _HangInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        hang_forever()
        return grad


def hang_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(text.split(","))
    if not kinds or not set(kinds) <= {"forward", "backward", "data", "pause", "slow"}:
        raise argparse.ArgumentTypeError(f"not a hang: {text!r}")
    return kinds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--hang-rank", type=int, default=None)
    p.add_argument("--hang-in", type=hang_kinds, default=(), help="forward|backward|data|pause|slow, or slow,pause")
    p.add_argument("--hang-module", default="blocks.1.mlp")
    p.add_argument("--hang-step", type=int, default=10)
    p.add_argument("--pause-step", type=int, default=None, help="the pause's step (default: --hang-step)")
    p.add_argument("--pause-s", type=float, default=8.0)
    p.add_argument("--step-s", type=float, default=0.0)
    p.add_argument("--mark", default="")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    MARK["path"] = args.mark
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = TinyGPT(vocab=256, dim=64, heads=4, layers=2, context=32)
    progress = {"step": 0}
    hangs_here = args.hang_rank == rank
    hang_in = set(args.hang_in)
    pause_step = args.hang_step if args.pause_step is None else args.pause_step
    if hangs_here and hang_in & {"forward", "backward", "slow"}:
        module = model.get_submodule(args.hang_module)
        original = module.forward

        def forward(*a, **kw):
            now = progress["step"] == args.hang_step
            if now and "forward" in hang_in:
                hang_forever()
            if now and "slow" in hang_in:
                return run_for(args.pause_s, original, *a, **kw)
            out = original(*a, **kw)
            return _HangInBackward.apply(out) if now and "backward" in hang_in else out

        module.forward = forward
    wrapped = DistributedDataParallel(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(rank)

    def next_batch(step: int) -> torch.Tensor:
        if hangs_here and "data" in hang_in and step == args.hang_step:
            hang_forever()
        if args.step_s:
            time.sleep(args.step_s)  # a slow data loader
        return torch.randint(256, (8, 33), generator=data)

    def save_checkpoint() -> None:
        time.sleep(args.pause_s)

    for step in range(args.steps):
        progress["step"] = step
        tokens = next_batch(step)
        logits = wrapped(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if "pause" in hang_in and step == pause_step:
            save_checkpoint()
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    dist.barrier()
    time.sleep(0.05)
    del wrapped, opt
    dist.destroy_process_group()
    if rank == 0:
        print("done", flush=True)


if __name__ == "__main__":
    main()
