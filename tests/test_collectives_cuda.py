"""On a real GPU: NCCL's completion hook times a real all-reduce, and where the collector places an NCCL wait.

The collector (collector/pipeline/collectives.py) places a rank's NCCL wait where its kernel ended, taking the
kernel to start when the host issued it (its stream idle) and to end `active` later: a wait inside a module's
CUDA-event window is then taken out of that module. One GPU, one rank: no wait to see, but the hook's figures
and that placement are checked against the module's own window (the all-reduce runs inside it).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from modtrack.agent import ModuleTracker
from modtrack.agent.collectives import Collectives
from modtrack.agent.step_accumulator import build_step_records

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class Reduce(nn.Module):
    def forward(self, x):
        y = x * 2
        dist.all_reduce(y)
        return y


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1024, 1024)
        self.reduce = Reduce()

    def forward(self, x):
        return self.reduce(self.lin(x))


def test_nccl_hook_times_a_real_all_reduce_whose_kernel_ends_inside_the_module_that_called_it(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        collectives = Collectives(flight_recorder=False, hook_grace_s=0.0)
        records: list = []
        collectives.attach(records)  # finds the group and hooks it, before it runs anything
        model = Model().cuda()
        x = torch.randn(16384, 1024, device="cuda")  # 64 MB all-reduced per step
        with ModuleTracker(clock="cuda", on_step=records.append) as t:
            for _ in range(8):
                torch.cuda.synchronize()  # an idle GPU at each step: a kernel starts when issued
                model(x).sum().backward()
                t.step()
            reduce_id = t.module_names.index("Model.reduce")
        torch.cuda.synchronize()
        build_step_records(records)
        stats: list = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(s.count for s in stats) < 7:
            time.sleep(0.2)  # the watchdog sees works done on its own thread
            collectives.attach(records)
            stats = [s for r in records for s in r.collectives]
        assert stats and all(s.backend == "nccl" and s.active_measured for s in stats), collectives.counters
        ends = []
        by_step = {r.step: r for r in records}
        for s in stats:
            forward = by_step[s.step].phases["forward"]
            at = forward.module_id.tolist().index(reduce_id)
            start, end = int(forward.first_start_ns[at]), int(forward.last_end_ns[at])
            for issue, active in zip(s.issue_ns, s.active_ns):
                assert active > 0
                ends.append((issue + active - start) / 1e6)
                print(
                    f"step {s.step}: kernel end {ends[-1]:.3f} ms into the module's window of {(end - start) / 1e6:.3f}"
                )
                assert start - 1_000_000 <= issue + active <= end + 1_000_000  # within 1 ms of the window
        assert len(ends) >= 6
    finally:
        dist.destroy_process_group()
