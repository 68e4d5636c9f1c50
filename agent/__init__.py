"""modtrack's in-process agent: times every nn.Module call on this rank, step by step."""

from modtrack.agent.tracker import ModuleTracker

__all__ = ["ModuleTracker", "track", "step"]


def __getattr__(name):
    # track()/step() bring in the gRPC transport; loaded on first use so that the tracker alone
    # (a drop-in for torch.utils.module_tracker) needs neither grpc nor a collector.
    if name in ("track", "step"):
        from modtrack.agent import api

        return getattr(api, name)
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
