"""torchrun in its own process group, so that ending it (a timeout, a failed test) ends its ranks too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from harness.collector_process import REPO, env

TRAIN = os.path.join(REPO, "examples", "train.py")


def torchrun_cmd(ranks: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc-per-node RANKS ARGS` with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *args]


def start(cmd: list[str], cwd=REPO, extra_env: dict | None = None, **popen) -> subprocess.Popen:
    """In its own process group; one thread per rank (OMP_NUM_THREADS=1), this checkout importable."""
    return subprocess.Popen(
        cmd, cwd=cwd, env=env(OMP_NUM_THREADS="1", **(extra_env or {})), start_new_session=True, **popen
    )


def end(proc: subprocess.Popen, grace_s: float = 0.0) -> None:
    """End the whole group: SIGTERM first when grace_s > 0 (torchrun passes it on), then SIGKILL; reap it."""
    if proc.poll() is None and grace_s > 0:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    for pid in [proc.pid, *descendants(proc.pid)]:  # a rank that left the group (its own session) too
        try:
            os.killpg(pid, signal.SIGKILL) if pid == proc.pid else os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # something outside the tree still holds its pipes: stop reading them
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """(stdout, stderr) once it exits; past `timeout` it is killed and the test fails: it hung."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.args[:6]} did not finish within {timeout} s: it hung") from None
    finally:
        end(proc)


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """start() and finish(): the completed process with its text output."""
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    stdout, stderr = finish(proc, timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_all(cmds: list[list[str]], timeout: float = 300, **kw) -> list[subprocess.CompletedProcess]:
    """run() of independent commands at once, for tests that time none of them: a CPU's worth of work
    each, side by side on 2 cores instead of one after the other. Every one is ended, whatever happens."""
    procs = [start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw) for cmd in cmds]
    try:
        outs = [finish(proc, timeout) for proc in procs]
    finally:
        for proc in procs:
            end(proc)
    return [subprocess.CompletedProcess(cmd, p.returncode, *out) for cmd, p, out in zip(cmds, procs, outs)]
