"""A tiny gloo DDP job that ends the way many scripts do: destroy_process_group(), then the function returns
with the DDP model still a local (no barrier, no del, no gc). With --cycles N it does that N times in one
process (init, train, destroy, return): each return is one more chance to hang at exit, as a job under an
older agent did 1 time in 3 (agent/teardown.py; tests/test_exit_hang.py, tests/bench/exit_hang.py). With
--tracked each cycle trains inside `with ModuleTracker():` (the seed's way, no launcher flag) and destroys the group
after the block, when the tracker no longer guards destroy_process_group().
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def train(steps: int, cycle: int, tracked: bool = False) -> None:
    if cycle == 0:
        dist.init_process_group("gloo")
    else:  # a group of its own: the first one's keys are still in torchrun's store
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"cycle-{cycle}", store), rank=rank, world_size=size)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 64)
    if tracked:
        from modtrack.agent import ModuleTracker

        block = ModuleTracker()
    else:
        block = contextlib.nullcontext()
    with block:
        for _ in range(steps):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument("--tracked", action="store_true", help="train each cycle inside `with ModuleTracker():`")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for cycle in range(args.cycles):
        train(args.steps, cycle, args.tracked)
        print(f"CYCLE {cycle} done", flush=True)


if __name__ == "__main__":
    main()
