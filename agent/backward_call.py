"""When the training loop calls backward: where a backward pass really starts.

The tracker's own backward hooks sit on the autograd nodes of modules' outputs, and the engine runs
other hooks on those nodes first: FSDP2's pre-backward hook on the root's outputs and FSDP1's on each
unit's (both all-gather parameters, and so wait there for every peer), and before them the loss's own
backward. Timed from the first module's backward, all of that would fall between forward and backward,
where the host's own code runs (the loss, a user's logging): every rank waiting for one slow peer would
show the same gap, and the slow one could not be told from the others.

So `torch.autograd.backward` (what `Tensor.backward` calls) is wrapped while a tracker is open: each
tracker is told when the call begins and ends, on the calling thread, before the engine runs anything.
One wrapper for all trackers; it stays a plain pass-through once the last one is gone. Code that took a
reference to the original before the wrapper went in (or that calls `torch.autograd.grad`) is not seen:
its pass then starts at its first module's backward, as before. Never raises: a listener's error is
swallowed by the listener (the tracker's hooks are fail-open).
"""

from __future__ import annotations

import functools

import torch

from modtrack.agent.patch import Patch


def _wrap(original, listeners: list):
    @functools.wraps(original)
    def backward(*args, **kwargs):
        told = [t for t in tuple(listeners) if t._backward_called()]
        try:
            return original(*args, **kwargs)
        finally:
            for t in told:
                t._backward_returned()

    return backward


_patch = Patch(torch.autograd, "backward", _wrap)
_listeners = _patch.listeners  # trackers: their _backward_called() -> bool (True: call _backward_returned after)
add = _patch.add  # tell a tracker about every backward call from now on (the wrapper goes in with the first)
remove = _patch.remove  # stop telling it; with no tracker left the original goes back (see agent/patch.py)
