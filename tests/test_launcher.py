"""`python -m agent SCRIPT` behaves as `python SCRIPT`: argv, sys.path, __main__, output, exit code."""

from __future__ import annotations

import re
import sys
import textwrap
import time

import pytest

from harness import torchrun as launch
from harness.fake_collector import FakeCollector
from harness.ports import free_port

SCRIPT = textwrap.dedent("""
    import os, sys
    import helper_next_to_script  # found through sys.path[0] = the script's directory
    # one write: torchrun runs ranks unbuffered into one pipe, and print() would interleave them
    os.write(1, f"argv {sys.argv[1:]} name {__name__} path0 {os.path.basename(sys.path[0])}\\n".encode())
    def fail():
        raise ValueError("boom")
    if sys.argv[1:2] == ["raise"]:
        fail()
    if sys.argv[1:2] == ["exit3"]:
        print("leaving with 3", file=sys.stderr)
        sys.exit(3)
""")


@pytest.fixture
def script(tmp_path):
    d = tmp_path / "proj"
    d.mkdir()
    (d / "helper_next_to_script.py").write_text("")
    path = d / "user_script.py"
    path.write_text(SCRIPT)
    return path


def run(cmd, cwd, env=None, timeout=120):
    """(completed process, seconds): in its own process group, so a timeout ends torchrun's ranks too."""
    started = time.monotonic()
    out = launch.run(cmd, timeout, cwd=cwd, extra_env=env)
    return out, time.monotonic() - started


def without_agent_lines(stderr: str) -> str:
    """The agent's own warnings removed, even one written (from its sender thread) between the pieces of
    a traceback line."""
    return re.sub(r"modtrack: [^\n]*\n", "", stderr)


ARGS = [["a", "--flag", "-x"], ["raise"], ["exit3"]]


@pytest.mark.parametrize("collector", [None, "dead"])
def test_same_behaviour_as_plain_python(script, tmp_path, collector):
    """Each of ARGS plain and under the agent: all six runs side by side (a torch import each under the agent)."""
    agent_opts = [] if collector is None else ["--collector", f"127.0.0.1:{free_port()}", "--job", "t"]
    started = time.monotonic()
    runs = launch.run_all(
        [[sys.executable, str(script), *args] for args in ARGS]
        + [[sys.executable, "-m", "modtrack.agent", *agent_opts, str(script), *args] for args in ARGS],
        timeout=120,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - started
    for args, plain, tracked in zip(ARGS, runs[: len(ARGS)], runs[len(ARGS) :]):
        assert tracked.returncode == plain.returncode, args
        assert plain.returncode == {"raise": 1, "exit3": 3}.get(args[0], 0), args
        assert tracked.stdout == plain.stdout, args
        assert without_agent_lines(tracked.stderr) == plain.stderr, args  # same traceback, no launcher frames
        assert len(tracked.stderr.splitlines()) - len(plain.stderr.splitlines()) <= 2, args
    assert elapsed < 30  # all of them together


def test_environment_variable_names_the_collector(script, tmp_path):
    """MODTRACK_COLLECTOR alone switches tracking on; an unreachable one changes nothing."""
    out, _ = run(
        [sys.executable, "-m", "modtrack.agent", str(script), "x"],
        cwd=tmp_path,
        env={"MODTRACK_COLLECTOR": f"127.0.0.1:{free_port()}"},
    )
    assert out.returncode == 0 and out.stdout.startswith("argv ['x'] name __main__ path0 proj")


def test_console_script_and_missing_script(script, tmp_path):
    out, missing = launch.run_all(
        [["modtrack-agent", str(script), "y"], [sys.executable, "-m", "modtrack.agent", str(tmp_path / "nope.py")]],
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0 and out.stdout.startswith("argv ['y'] name __main__")
    assert missing.returncode == 2 and "can't open file" in missing.stderr


def torchrun(*args):
    return launch.torchrun_cmd(2, *args)


def stdout_lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith("argv"))


@pytest.mark.slow
@pytest.mark.parametrize("args", [["a"], ["exit3"]])
def test_under_torchrun(script, tmp_path, args):
    dead = f"127.0.0.1:{free_port()}"
    plain, tracked, no_python = launch.run_all(
        [
            torchrun(str(script), *args),
            torchrun("-m", "modtrack.agent", "--collector", dead, str(script), *args),
            torchrun("--no-python", "modtrack-agent", "--collector", dead, str(script), *args),
        ],
        timeout=120,
        cwd=tmp_path,
    )
    assert plain.returncode == (0 if args == ["a"] else 1)
    expected = set(stdout_lines(plain.stdout))
    assert len(expected) == 1  # both ranks print the same line
    for out in (tracked, no_python):
        assert out.returncode == plain.returncode, out.stderr[-2000:]
        lines = stdout_lines(out.stdout)
        if args == ["a"]:
            assert lines == stdout_lines(plain.stdout) and len(lines) == 2
        else:  # torchrun stops the other rank once one exits 3: it may not have printed yet
            assert lines and set(lines) == expected, out.stdout


TIMED = textwrap.dedent("""
    import statistics, sys, time
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU()) for _ in range(8)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(256, 256)
    times = []
    for step in range(60):
        t = time.perf_counter()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    print(f"loss {model(x).square().mean().item():.6f}")
    print(f"ms {statistics.median(times[10:]) * 1000:.3f}", file=sys.stderr)
""")


def step_ms(stderr: str) -> float:
    return float(re.search(r"^ms ([0-9.]+)$", stderr, re.M).group(1))


def test_dead_collector_costs_no_step_time_and_no_exit_time(tmp_path):
    path = tmp_path / "timed.py"
    path.write_text(TIMED)
    plain, plain_s = run([sys.executable, str(path)], cwd=tmp_path)
    tracked, tracked_s = run(
        [sys.executable, "-m", "modtrack.agent", "--collector", f"127.0.0.1:{free_port()}", str(path)], cwd=tmp_path
    )
    assert plain.returncode == tracked.returncode == 0, tracked.stderr
    assert tracked.stdout == plain.stdout  # same numbers: the agent changes nothing
    # Tracking costs a little per module call; the dead link itself must cost nothing.
    assert step_ms(tracked.stderr) < step_ms(plain.stderr) * 2 + 5, (plain.stderr, tracked.stderr)
    assert tracked_s < plain_s + 5, (plain_s, tracked_s)


FORKING = textwrap.dedent("""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=8, num_workers=2)
    for epoch in range(2):
        for x, y in data:  # worker processes are forked while the sender thread is in gRPC
            loss = (model(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"loss {loss.item():.6f}")
""")


def test_forked_data_loader_workers_print_nothing_extra(tmp_path, serve):
    fake = FakeCollector()
    _, port = serve(fake)
    path = tmp_path / "forking.py"
    path.write_text(FORKING)
    plain, tracked = launch.run_all(
        [
            [sys.executable, str(path)],
            [sys.executable, "-m", "modtrack.agent", "--collector", f"127.0.0.1:{port}", "--job", "fork", str(path)],
        ],
        timeout=120,
        cwd=tmp_path,
    )
    assert plain.returncode == tracked.returncode == 0, tracked.stderr
    assert tracked.stdout == plain.stdout
    assert tracked.stderr == plain.stderr == ""
    assert sorted(set(fake.received)) == list(range(8))  # every step arrived, flushed at exit


CLOCK = textwrap.dedent("""
    import modtrack.agent.api
    print("clock", modtrack.agent.api._active.tracker._clock.durations)
""")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_clock_choice_reaches_the_tracker(tmp_path, how):
    path = tmp_path / "clock.py"
    path.write_text(CLOCK)
    dead = f"127.0.0.1:{free_port()}"
    agent = [sys.executable, "-m", "modtrack.agent"]
    chosen = [*agent, "--collector", dead, *(["--clock", "wall"] if how == "flag" else []), str(path)]
    out, bad = launch.run_all(
        [chosen, [*agent, "--clock", "sundial", str(path)]],  # the bad flag's run sees the variable too
        timeout=120,
        cwd=tmp_path,
        extra_env={} if how == "flag" else {"MODTRACK_CLOCK": "wall"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clock wall"
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
