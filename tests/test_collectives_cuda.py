"""On a real GPU: NCCL's completion hook times real all-reduces, and where the collector places an NCCL wait.

The collector (collector/pipeline/collectives.py) places a rank's NCCL wait where its kernel ended, taking the
kernel to start when the host issued it (its stream idle) and to end `active` later: a wait inside a module's
CUDA-event window is then taken out of that module. One GPU, one rank: no wait to see, but the hook's figures
and that placement are checked against the module's own windows (it runs an all-reduce in each of its two calls,
whose windows go out as call windows, on the GPU's clock).
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
        return self.reduce(self.reduce(self.lin(x)))  # called twice: each call's window goes out (call_windows)


def test_nccl_hook_times_a_real_all_reduce_whose_kernel_ends_inside_the_module_that_called_it(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        collectives = Collectives(flight_recorder=False, hook_grace_s=0.0)
        records: list = []
        collectives.attach(records)  # finds the group and hooks it, before it runs anything
        model = Model().cuda()
        x = torch.randn(16384, 1024, device="cuda")  # 64 MB all-reduced per step
        with ModuleTracker(clock="cuda", on_step=records.append) as t:
            t.call_windows = True  # as with MODTRACK_COLLECTIVES=on on CUDA
            for _ in range(8):
                torch.cuda.synchronize()  # an idle GPU at each step: a kernel starts when issued
                model(x).sum().backward()
                t.step()
            reduce_id = t.module_names.index("Model.reduce")
        torch.cuda.synchronize()
        build_step_records(records)
        stats: list = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(s.count for s in stats) < 14:
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
            calls = list(zip(forward.call_start_ns.tolist(), forward.call_end_ns.tolist()))
            assert forward.calls[at] == 2 and len(calls) == 2  # Model.reduce's two calls, on the GPU's clock
            assert calls[0][0] == start and calls[1][1] == end and calls[0][1] <= calls[1][0]
            for issue, active in zip(s.issue_ns, s.active_ns):
                assert active > 0
                ends.append((issue + active - start) / 1e6)
                print(
                    f"step {s.step}: kernel end {ends[-1]:.3f} ms into the module's window of {(end - start) / 1e6:.3f}"
                    f" (its calls: {[((a - start) / 1e6, (b - start) / 1e6) for a, b in calls]})"
                )
                # within 1 ms of one of the calls' windows
                assert any(a - 1_000_000 <= issue + active <= b + 1_000_000 for a, b in calls)
        assert len(ends) >= 12
    finally:
        dist.destroy_process_group()
