"""agent.track() / agent.step(): tracking for a process, wired to a collector.

This is what the launcher calls, and what custom loops call themselves. It never raises
into the training job: if anything cannot be set up, it says so once on stderr and the
job runs as it would without the agent.
"""

from __future__ import annotations

import atexit

from modtrack.agent import config
from modtrack.agent.identity import identity_from_env
from modtrack.agent.transport import Transport, warn_once

_active: Tracking | None = None


class Tracking:
    """A running tracker and its sender; close() is idempotent and bounded in time."""

    def __init__(self, tracker=None, transport: Transport | None = None, gpu_health=None):
        self.tracker = tracker
        self.transport = transport
        self.gpu_health = gpu_health  # agent.gpu_health.GpuHealthSampler, or None
        self._closed = False

    def step(self) -> None:
        """End a step by hand (loops with no optimizer)."""
        if self.tracker is not None:
            try:
                self.tracker.step()
            except Exception as e:
                warn_once("step", f"step() failed: {e}")

    def close(self) -> None:
        global _active
        if self._closed:
            return
        self._closed = True
        if _active is self:
            _active = None
        for part in (self.tracker, self.transport, self.gpu_health):
            if part is None:
                continue
            try:
                part.close()
            except Exception as e:
                warn_once(f"close-{type(part).__name__}", f"closing {type(part).__name__} failed: {e}")

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def track(
    collector: str | None = None,
    job: str | None = None,
    *,
    token: str | None = None,
    token_file: str | None = None,
    tls_ca: str | None = None,
    clock: str = "auto",
    fallback_job: str = "",
    sample_every: int | None = None,
) -> Tracking:
    """Time every module of this process and stream the steps to `collector` (HOST:PORT).

    Settings left out come from MODTRACK_COLLECTOR, MODTRACK_JOB, MODTRACK_TOKEN,
    MODTRACK_TLS_CA (a CA file: the collector serves TLS), MODTRACK_SAMPLE_EVERY (module detail on every Nth
    step only; the collector can change it). With no collector at all this returns a handle that does nothing.
    """
    global _active
    if _active is not None:
        return _active
    env = config.from_env()
    collector = collector or env.collector
    if not collector:
        return Tracking()
    try:
        if token_file:
            token = _read(token_file).decode().strip()
        token = token or env.token or None
        tls_ca = tls_ca or env.tls_ca or None
        ca = _read(tls_ca) if tls_ca else None
        from modtrack.agent.heartbeat import Heartbeat, HeartbeatSettings
        from modtrack.agent.tracker import ModuleTracker

        identity = identity_from_env(job, fallback_job=fallback_job)
        transport = Transport(
            collector,
            identity,
            token=token,
            tls_ca=ca,
            on_capture=lambda capture_id, steps: tracker.request_trace(capture_id, steps),
            on_sampling=lambda every: tracker.set_sampling(every),
            hook_errors=lambda: tracker.counters.get("hook_errors", 0),
        )
        tracker = ModuleTracker(on_step=transport.submit, clock=clock, seed_parents=False)
        tracker.set_sampling(config.sample_every(sample_every if sample_every is not None else env.sample_every))
        transport.heartbeat = Heartbeat(tracker.position, lambda: tracker.module_names, HeartbeatSettings.from_env())
        transport.clock_kind = "wall" if tracker.wall_durations else tracker.clock_kind
        if env.collectives == "on":
            from modtrack.agent.collectives import Collectives

            transport.collectives = Collectives()
            tracker.call_windows = tracker.wall_durations or tracker.clock_kind == "cuda"
        gpu_health = _gpu_health(env, identity.local_rank)
        transport.gpu_health = gpu_health
        tracker.__enter__()
        transport.start()
    except Exception as e:
        warn_once("setup", f"tracking is off: {type(e).__name__}: {e}")
        return Tracking()
    _active = Tracking(tracker, transport, gpu_health)
    atexit.register(_active.close)
    return _active


def _gpu_health(env: config.AgentEnv, local_rank: int):
    """The GPU health sampler (MODTRACK_GPU_HEALTH=on, the default), started; it does nothing until the
    job uses CUDA. None when it is off or cannot start (said once)."""
    if env.gpu_health.strip().lower() in ("off", "0", "false", "no"):
        return None
    try:
        from modtrack.agent.gpu_health import GpuHealthSampler

        return GpuHealthSampler(local_rank).start()
    except Exception as e:
        warn_once("gpu-health", f"GPU health is off: {type(e).__name__}: {e}")
        return None


def step() -> None:
    """End a step by hand for the tracking started by track() (no-op without one)."""
    if _active is not None:
        _active.step()
