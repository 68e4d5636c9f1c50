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

_listeners: list = []  # trackers: their optimizer_steps count and _optimizer_skipped(optimizer)
_wrapper = None  # ours, while it is in; _original: what it wraps
_original = None


def _scaler_class():
    amp = getattr(torch, "amp", None)
    return getattr(amp, "GradScaler", None)


def _wrap(original):
    @functools.wraps(original)
    def step(self, optimizer, *args, **kwargs):
        before = [(t, t.optimizer_steps) for t in tuple(_listeners)]
        result = original(self, optimizer, *args, **kwargs)
        for tracker, steps in before:
            if tracker.optimizer_steps == steps:
                tracker._optimizer_skipped(optimizer)
        return result

    return step


def add(tracker) -> None:
    global _original, _wrapper
    scaler = _scaler_class()
    if scaler is None:
        return
    if tracker not in _listeners:
        _listeners.append(tracker)
    if _wrapper is None:
        _original = scaler.step
        _wrapper = scaler.step = _wrap(_original)


def remove(tracker) -> None:
    global _original, _wrapper
    if tracker in _listeners:
        _listeners.remove(tracker)
    scaler = _scaler_class()
    if not _listeners and scaler is not None and _original is not None and scaler.step is _wrapper:
        scaler.step = _original
        _original = _wrapper = None
