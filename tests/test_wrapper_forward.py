"""A wrapper's forward (DDP, FSDP1) is the model's forward as the user calls it: its time is forward, not data.

FSDP1's root all-gathers its parameters in its own forward, before the module it wraps runs. Under a slow loader
on one rank, every peer waits there; counted as data loading, every rank's data time looked alike and the slow
loader was never found (issue 13). Here the wrapper is held up by a known sleep in a hook of its own (inside its
forward, outside the module it wraps), and the step's figures must carry it in forward, not in data.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from harness.ports import free_port
from modtrack.agent.tracker import ModuleTracker

HELD_MS = 30.0


def ddp(model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model)


def fsdp1(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"))


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", [ddp, fsdp1], ids=["ddp", "fsdp1"])
def test_time_in_a_wrappers_forward_outside_its_module_is_forward_time(process_group, wrap):
    torch.manual_seed(0)
    wrapped = wrap(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)))
    wrapped.register_forward_pre_hook(lambda mod, args: time.sleep(HELD_MS / 1e3))  # the wrapper's, not its module's
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.01)
    records = []
    with ModuleTracker(on_step=records.append, clock="cpu"):
        for _ in range(4):
            wrapped(torch.randn(8, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert len(records) == 4
    for r in records[1:]:  # the first call meets the modules (hooks installed while it runs)
        inner = r.phases["forward"].inclusive_ns.max() / 1e6  # the wrapped module's own forward (CPU time)
        assert r.forward_ns / 1e6 >= HELD_MS + inner * 0.5, (r.forward_ns, inner)
        assert r.data_ns / 1e6 < HELD_MS / 2, r.data_ns
