"""Who this rank is: job, rank and host, read from torchrun's environment.

Every rank must arrive at the same job id without talking to the others, so the id comes
from what torchrun gives all of them alike (the rendezvous id, else the master address).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from modtrack.agent import config


@dataclass(frozen=True)
class Identity:
    job: str
    rank: int
    local_rank: int
    world_size: int
    group_rank: int
    host: str
    pid: int
    attempt: int | None = None  # torchelastic's restart count; None outside torchelastic


def _int_env(env, name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        return default


def default_job(env=os.environ, fallback: str = "") -> str:
    """MODTRACK_JOB, else torchrun's run id, else the rendezvous address, else `fallback`.

    torchrun's run id is the literal "none" unless --rdzv-id or --standalone set it, and
    would merge unrelated jobs, so it does not count.
    """
    job = config.from_env(env).job
    if job:
        return job
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return run_id
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return f"job-{env['MASTER_ADDR']}-{env['MASTER_PORT']}"
    return fallback or f"{socket.gethostname()}-{os.getpid()}"


def identity_from_env(job: str | None = None, env=os.environ, fallback_job: str = "") -> Identity:
    """The rank's identity; without torchrun it is rank 0 of a one-rank job."""
    return Identity(
        job=job or default_job(env, fallback_job),
        rank=_int_env(env, "RANK", 0),
        local_rank=_int_env(env, "LOCAL_RANK", 0),
        world_size=max(1, _int_env(env, "WORLD_SIZE", 1)),
        group_rank=_int_env(env, "GROUP_RANK", 0),
        host=socket.gethostname(),
        pid=os.getpid(),
        attempt=_int_env(env, "TORCHELASTIC_RESTART_COUNT", 0) if "TORCHELASTIC_RESTART_COUNT" in env else None,
    )
