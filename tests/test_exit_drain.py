"""agent/teardown.py in one process: the tracker keeps each backward pass's Context (the one torch stashed for
it, which the pass's gloo works hold), and destroy_process_group() waits, GIL released, until nobody else
holds it; bounded, and gone once tracking closes. The hang itself is tested on real torchrun in
tests/test_exit_hang.py."""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harness.ports import free_port
from modtrack.agent import ModuleTracker
from modtrack.agent.teardown import ExitDrain

torch.set_num_threads(1)


def _stashed_context(seen: list):
    """An engine callback that records the Context torch stashed for the running backward."""

    def hook(_grad):
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: seen.append(torch._C._get_obj_in_tls("context"))
        )

    return hook


def test_each_pass_context_is_kept_and_a_ddp_job_destroys_its_group_without_waiting():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    seen: list = []
    with ModuleTracker(clock="cpu") as tracker:
        assert dist.destroy_process_group.__wrapped__ is not None  # ours while tracking
        model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)))
        for _ in range(3):
            loss = model(torch.randn(4, 8)).sum()
            loss.grad_fn.register_prehook(_stashed_context(seen))
            loss.backward()
        held = list(tracker.exit_drain._held)
        assert len(seen) == 3 and [id(c) for c in held] == [id(c) for c in seen]  # the very objects torch stashed
        del held
        seen.clear()  # (the last loss's node still holds the list)
        started = time.perf_counter()
        dist.destroy_process_group()
        assert time.perf_counter() - started < 0.5
        assert tracker.exit_drain.counters["drain_timeouts"] == 0
        assert not tracker.exit_drain._held  # let go once the group is destroyed
    assert not hasattr(dist.destroy_process_group, "__modtrack_drain__")  # the original is back
    assert not hasattr(dist.distributed_c10d.destroy_process_group, "__modtrack_drain__")


def test_drain_waits_until_another_thread_lets_go():
    drain = ExitDrain()
    context = object()
    drain._held.append(context)
    holder = [context]  # someone else (a gloo worker's work, here a thread) still holds it
    del context

    def let_go():
        time.sleep(0.05)
        holder.clear()  # needs the GIL, as the worker's release does

    thread = threading.Thread(target=let_go)
    started = time.perf_counter()
    thread.start()
    assert drain.drain(timeout_s=5.0)
    waited = time.perf_counter() - started
    thread.join()
    assert 0.045 <= waited < 2.0
    assert drain.counters == {"drain_waits": 1, "drain_timeouts": 0}
    assert not drain._held


def test_drain_is_bounded_when_something_never_lets_go():
    drain = ExitDrain()
    forever = object()
    drain._held.append(forever)
    started = time.perf_counter()
    assert not drain.drain(timeout_s=0.1)
    assert 0.1 <= time.perf_counter() - started < 1.0
    assert drain.counters == {"drain_waits": 1, "drain_timeouts": 1}
    assert drain.drain(timeout_s=0.1)  # nothing left to wait for
