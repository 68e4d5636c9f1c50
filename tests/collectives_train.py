"""A small DDP job (gloo) whose --late-rank sleeps --late-ms before each step's forward: it reaches the
gradient all-reduce that much after its peers, who wait for it there (tests/test_collectives_torchrun.py).

    torchrun --nproc-per-node 2 -m modtrack.agent --collector HOST:PORT tests/collectives_train.py \
        --late-rank 1 --late-ms 40 --steps 30
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--late-rank", type=int, default=1)
    parser.add_argument("--late-ms", type=float, default=40.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--extra", type=int, default=0, help="small all-reduces per step (fill the Flight Recorder)")
    parser.add_argument("--print-step-ms", action="store_true", help="rank 0 prints its median step wall time")
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
    small = torch.ones(8)
    times = []
    for _ in range(args.steps):
        begun = time.perf_counter()
        if rank == args.late_rank and args.late_ms:
            time.sleep(args.late_ms / 1e3)  # blocks in C code, off the thread's CPU time
        for _ in range(args.extra):
            dist.all_reduce(small)
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - begun)
    if args.print_step_ms and rank == 0:
        times.sort()
        print(f"STEP_MS {1e3 * times[len(times) // 2]:.4f}", flush=True)
    # Torn down in the order examples/train.py explains (a DDP reducer freed implicitly as main() returns could
    # deadlock gloo's worker threads against the GIL: 1 run in 3 here under the agent before agent/teardown.py)
    dist.barrier()
    time.sleep(0.05)
    del model, opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
