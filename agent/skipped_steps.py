"""Optimizer steps that a GradScaler skips: the training step ends there all the same.

With float16 mixed precision, `GradScaler.step(optimizer)` does not call `optimizer.step()` when the scaled
gradients hold an inf or a NaN (it lowers the scale instead): often in the first steps, then every few thousand.
No optimizer step hook runs, so the tracker's step went on into the next iteration: two iterations in one step,
their forwards and backwards together, on every rank at once. So `GradScaler.step` is wrapped while a tracker is
open: a call after which no optimizer stepped ends the step as an optimizer step would, with ~0 optimizer time.
One wrapper for all trackers, put back when the last one closes (unless someone wrapped ours since: then ours
stays in theirs, a pass-through). A torch without `torch.amp.GradScaler` is left alone.
"""

from __future__ import annotations

import functools

import torch

from modtrack.agent.patch import Patch


def _wrap(original, listeners: list):
    @functools.wraps(original)
    def step(self, optimizer, *args, **kwargs):
        before = [(t, t.optimizer_steps) for t in tuple(listeners)]
        result = original(self, optimizer, *args, **kwargs)
        for tracker, steps in before:
            if tracker.optimizer_steps == steps:
                tracker._optimizer_skipped(optimizer)
        return result

    return step


_patch = Patch(getattr(getattr(torch, "amp", None), "GradScaler", None), "step", _wrap)
add, remove = _patch.add, _patch.remove  # trackers: their optimizer_steps count and _optimizer_skipped(optimizer)
