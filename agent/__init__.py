"""modtrack's in-process agent: times every nn.Module call on this rank, step by step."""
from agent.tracker import ModuleTracker

__all__ = ["ModuleTracker"]
