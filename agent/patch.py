"""One wrapper of a torch entry point for every tracker that listens, in place while any does.

The agent wraps a few of torch's entry points while a tracker is open (agent/backward_call.py,
agent/skipped_steps.py, agent/data_loading.py). The wrapper goes in with the first tracker and the original comes
back with the last, unless someone wrapped ours since: then ours stays in theirs, a pass-through that tells nobody.
"""

from __future__ import annotations

from collections.abc import Callable


class Patch:
    """`owner.name` wrapped by `wrap(original, listeners)` while `listeners` is not empty (owner None: nothing)."""

    def __init__(self, owner, name: str, wrap: Callable[[Callable, list], Callable]) -> None:
        self.owner, self.name, self._wrap = owner, name, wrap
        self.listeners: list = []  # the trackers told, in the order they came
        self._original: Callable | None = None
        self._wrapper: Callable | None = None  # ours, while it is in

    def add(self, tracker) -> None:
        if self.owner is None:
            return
        if tracker not in self.listeners:
            self.listeners.append(tracker)
        if self._wrapper is None:
            self._original = getattr(self.owner, self.name)
            self._wrapper = self._wrap(self._original, self.listeners)
            setattr(self.owner, self.name, self._wrapper)

    def remove(self, tracker) -> None:
        if tracker in self.listeners:
            self.listeners.remove(tracker)
        if not self.listeners and self._wrapper is not None and getattr(self.owner, self.name) is self._wrapper:
            setattr(self.owner, self.name, self._original)
            self._original = self._wrapper = None
