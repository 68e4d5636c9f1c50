"""The agent's settings come from one place, and importing it leaves the training process's environment alone."""

from __future__ import annotations

import os
import subprocess
import sys

from modtrack.agent import config
from modtrack.agent.identity import default_job


def test_every_variable_read_from_one_place():
    env = {
        "MODTRACK_COLLECTOR": "c:1",
        "MODTRACK_JOB": "j",
        "MODTRACK_TOKEN": "t",
        "MODTRACK_TLS_CA": "ca.pem",
        "MODTRACK_CLOCK": "wall",
        "MODTRACK_STALL_FACTOR": "4",  # hung jobs
        "MODTRACK_STALL_MIN_S": "2",
        "MODTRACK_STALL_REPEAT_S": "1",
        "MODTRACK_SAMPLE_EVERY": "4",  # sampled mode
        "MODTRACK_COLLECTIVES": "on",  # collective timing
        "MODTRACK_GPU_HEALTH": "off",  # GPU health
    }
    assert config.from_env(env) == config.AgentEnv(
        collector="c:1",
        job="j",
        token="t",
        tls_ca="ca.pem",
        clock="wall",
        stall_factor="4",
        stall_min_s="2",
        stall_repeat_s="1",
        sample_every="4",
        collectives="on",
        gpu_health="off",
    )
    assert config.from_env({}) == config.AgentEnv()
    assert config.from_env({"MODTRACK_CLOCK": ""}).clock == "auto"  # empty counts as unset
    assert set(config.VARIABLES) == set(env)
    assert [config.sample_every(v) for v in ("4", "1", "0", "-3", "x", None, 7)] == [4, 1, 1, 1, 1, 1, 7]
    assert default_job({"MODTRACK_JOB": "mine", "TORCHELASTIC_RUN_ID": "run"}) == "mine"


def test_sources_name_no_variable_outside_the_config_module():
    agent = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "agent")
    for name in os.listdir(agent):
        if name.endswith(".py") and name != "config.py":
            with open(os.path.join(agent, name)) as f:
                code = [line.split("#")[0] for line in f if "environ" in line or "env.get(" in line]
            assert not [line for line in code if "MODTRACK_" in line], name


def test_importing_the_transport_changes_no_environment_variable():
    code = (
        "import os, sys; before = dict(os.environ); import modtrack.agent.transport, modtrack.agent.api; "
        "assert 'grpc' in sys.modules; assert dict(os.environ) == before, "
        "set(os.environ.items()) ^ set(before.items())"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)
