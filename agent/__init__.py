"""modtrack's in-process agent: times every nn.Module call on this rank, step by step."""
from agent.tracker import ModuleTracker

__all__ = ["ModuleTracker"]

from agent.api import step, track  # noqa: E402  (custom loops: agent.track(...), agent.step())

__all__ += ["track", "step"]
