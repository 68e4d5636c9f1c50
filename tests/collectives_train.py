"""A small DDP job (gloo) whose --late-rank sleeps --late-ms before each step's forward: it reaches the
gradient all-reduce that much after its peers, who wait for it there (tests/test_collectives_torchrun.py).

    torchrun --nproc-per-node 2 -m modtrack.agent --collector HOST:PORT tests/collectives_train.py \
        --late-rank 1 --late-ms 40 --steps 30
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--late-rank", type=int, default=1)
    parser.add_argument("--late-ms", type=float, default=40.0)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 64)
    for _ in range(args.steps):
        if rank == args.late_rank:
            time.sleep(args.late_ms / 1e3)  # blocks in C code, off the thread's CPU time
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
