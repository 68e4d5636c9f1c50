"""Every MODTRACK_* environment variable the agent reads, in one place, with its default.

The launcher's flags and track()'s arguments win over these; these win over the defaults. The
agent only reads the environment, never writes it: it is the training process's, and its children's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

CLOCKS = ("auto", "cpu", "wall", "cuda")


@dataclass(frozen=True)
class AgentEnv:
    collector: str = ""  # MODTRACK_COLLECTOR: HOST:PORT; empty: tracking off
    job: str = ""  # MODTRACK_JOB: the job id (empty: torchrun's run id, see identity.default_job)
    token: str = ""  # MODTRACK_TOKEN: the collector's bearer token
    tls_ca: str = ""  # MODTRACK_TLS_CA: a CA file (PEM): the collector serves TLS
    clock: str = "auto"  # MODTRACK_CLOCK: auto | cpu | wall | cuda
    # hung jobs (agent/heartbeat.py): a heartbeat once the step in progress runs past both of these
    stall_factor: str = "3"  # MODTRACK_STALL_FACTOR: this many times the rank's median step
    stall_min_s: str = "5"  # MODTRACK_STALL_MIN_S: this many seconds
    stall_repeat_s: str = "3"  # MODTRACK_STALL_REPEAT_S: again this often while the step lasts
    # sampled mode: module detail on every Nth step (step numbers multiple of N), step-level figures on every
    # step; the collector can change it while the job runs (POST /api/v1/jobs/{job}/sampling)
    sample_every: str = "1"  # MODTRACK_SAMPLE_EVERY
    # collective timing (agent/collectives.py): on (NCCL's completion hook; the Flight Recorder for gloo and
    # groups whose hook is taken) or off (until the NCCL path is proven on a GPU)
    collectives: str = "off"  # MODTRACK_COLLECTIVES
    # GPU health (agent/gpu_health.py): the rank's GPU through NVML, once the job uses CUDA
    gpu_health: str = "on"  # MODTRACK_GPU_HEALTH: on | off


def variable(name: str) -> str:
    """The environment variable behind an AgentEnv field."""
    return f"MODTRACK_{name.upper()}"


VARIABLES = tuple(variable(f.name) for f in fields(AgentEnv))


def sample_every(value) -> int:
    """A sampling period from a variable, a flag or the wire: a whole number >= 1 (0, junk: 1, every step)."""
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


def from_env(env: Mapping[str, str] = os.environ) -> AgentEnv:
    """The agent's settings from `env`; a variable set to the empty string counts as unset."""
    defaults = AgentEnv()
    return AgentEnv(**{f.name: env.get(variable(f.name)) or getattr(defaults, f.name) for f in fields(AgentEnv)})
