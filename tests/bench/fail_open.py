"""Fail-open, measured: the same 2-rank torchrun training (examples/train.py, CPU, gloo) with no
agent, and under the agent with a healthy collector, no collector at all, a collector that
accepts connections and never reads, one frozen (SIGSTOP) a quarter into the run, and one
killed (kill -9) a quarter into the run. Prints, per case, the median step time of each rank,
its change against the run with no agent, each rank's process CPU per step (all its threads) and,
where a collector runs, the collector's CPU per step, the exit code, the agent's queue and replay
state and drops, and each rank's resident memory a third and two thirds into the run and at the end (the
queue holds 256 steps and the replay buffer 1,024: past that, memory must stay flat).

    python tests/bench/fail_open.py [--steps 300] [--rounds 1] [--cases healthy,absent,...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the shared harness (tests/harness/)
CASES = ("no agent", "healthy", "absent", "stalled", "frozen", "killed")
TRAIN_ARGS = [
    "--dim",
    "64",
    "--heads",
    "2",
    "--layers",
    "2",
    "--context",
    "32",
    "--batch",
    "8",
    "--vocab",
    "128",
    "--log-every",
    "1",
]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(argv: list[str]) -> None:
    """One rank: examples/train.py with a step timer on the optimizer; one JSON line at the end."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train

    steps = int(argv[argv.index("--steps") + 1])
    stamps, cpu, rss = [], [], {}

    def on_step(*_):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if len(stamps) in (steps // 3, 2 * steps // 3):
            rss[len(stamps)] = rss_mb()

    register_optimizer_step_post_hook(on_step)
    train.main(argv)
    rss["end"] = rss_mb()
    gaps = [b - a for a, b in zip(stamps[10:], stamps[11:])]  # after warm-up
    stats = {}
    try:
        from modtrack.agent import api

        if api._active is not None:
            stats = api._active.transport.stats
    except Exception:
        pass
    out = os.path.join(os.environ["FAILOPEN_OUT"], f"rank{os.environ.get('RANK', 0)}.json")
    with open(out, "w") as f:  # a file per rank: torchrun interleaves the ranks' stderr
        json.dump(
            {
                "rank": int(os.environ.get("RANK", 0)),
                "median_ms": statistics.median(gaps) * 1000,
                "cpu_ms": (cpu[-1] - cpu[10]) / (len(cpu) - 11) * 1000,
                "rss_mb": [rss.get(steps // 3), rss.get(2 * steps // 3), rss["end"]],
                "agent": stats,
            },
            f,
        )


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(case: str, steps: int, tmp: str, train_args: list[str] = TRAIN_ARGS) -> dict:
    from harness.collector_process import CollectorProcess, env
    from harness.ports import free_port
    from harness.stalled_server import StalledServer
    from harness.torchrun import torchrun_cmd

    os.makedirs(tmp, exist_ok=True)

    server = stalled = None
    target = f"127.0.0.1:{free_port()}"
    if case in ("healthy", "frozen", "killed"):
        server = CollectorProcess(os.path.join(tmp, case), log_path=os.path.join(tmp, f"{case}.log"))
        target = server.grpc_target
    elif case == "stalled":
        stalled = StalledServer()
        target = f"127.0.0.1:{stalled.port}"
    collector_cpu0 = proc_cpu_s(server.proc.pid) if server is not None else 0.0
    agent = [] if case == "no agent" else ["-m", "modtrack.agent", "--collector", target, "--job", case]
    cmd = torchrun_cmd(
        2,
        *agent,
        os.path.abspath(__file__),
        "--worker",
        "--steps",
        str(steps),
        *train_args,
    )
    started = time.monotonic()
    out_dir = os.path.join(tmp, f"{case}-ranks")
    os.makedirs(out_dir)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(OMP_NUM_THREADS="1", FAILOPEN_OUT=out_dir),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err_lines: list[str] = []
    threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True).start()
    try:
        for line in proc.stdout:
            if case in ("frozen", "killed") and line.startswith(f"step {steps // 4} "):
                if case == "frozen":
                    server.proc.send_signal(signal.SIGSTOP)
                else:
                    server.kill()
        proc.wait(300)
    finally:
        if proc.poll() is None:  # the ranks too: they are in its process group
            os.killpg(proc.pid, signal.SIGKILL)
        if server is not None and case != "healthy":
            if case == "frozen":
                server.proc.send_signal(signal.SIGCONT)
            server.kill()
        if stalled is not None:
            stalled.close()
    wall = time.monotonic() - started
    collector_cpu = None
    if server is not None and case == "healthy":
        collector_cpu = proc_cpu_s(server.proc.pid) - collector_cpu0
        server.kill()
    time.sleep(0.2)
    ranks = []
    for name in sorted(os.listdir(out_dir)):
        with open(os.path.join(out_dir, name)) as f:
            ranks.append(json.load(f))
    if len(ranks) != 2:
        sys.exit(f"{case}: the ranks reported nothing (exit {proc.returncode}):\n" + "".join(err_lines[-30:]))
    return {
        "case": case,
        "exit": proc.returncode,
        "wall_s": wall,
        "steps": steps,
        "collector_cpu_ms": None if collector_cpu is None else collector_cpu / steps * 1000,
        "ranks": sorted(ranks, key=lambda r: r["rank"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=1, help="runs per case, interleaved")
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help="comma-separated subset of: " + ", ".join(CASES) + " ('no agent' always runs: it is the baseline)",
    )
    p.add_argument(
        "--train-args",
        default=" ".join(TRAIN_ARGS),
        help="examples/train.py's model and batch (default: a 2-layer, dim-64 GPT)",
    )
    args = p.parse_args()
    cases = ["no agent"] + [c for c in args.cases.split(",") if c in CASES and c != "no agent"]
    import tempfile

    results: dict[str, list[dict]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for case in cases:
                results[case].append(run_case(case, args.steps, os.path.join(tmp, f"{r}"), args.train_args.split()))
    base = statistics.median(rk["median_ms"] for res in results["no agent"] for rk in res["ranks"])
    print(f"2 ranks, {args.steps} steps, median of each rank's step times after 10 warm-up steps")
    print(
        f"{'case':10} {'exit':>4} {'wall s':>7} {'step ms r0/r1':>15} {'vs no agent':>11} {'cpu ms r0/r1':>13} "
        f"{'queued':>6} {'unacked':>7} {'dropped':>7} {'rss MB at 1/3, 2/3, end':>26}"
    )
    for case in cases:
        for res in results[case]:
            rk = res["ranks"]
            ms = [x["median_ms"] for x in rk]
            over = (statistics.median(ms) / base - 1) * 100 if ms else float("nan")
            a = [x["agent"] for x in rk]

            def col(k, a=a):
                return "/".join(str(x.get(k, "-")) for x in a) if any(a) else "-"

            cpu_col = "/".join(f"{x['cpu_ms']:.2f}" for x in rk)
            mem = " ".join("->".join(f"{m:.0f}" for m in x["rss_mb"]) for x in rk)
            print(
                f"{case:10} {res['exit']:>4} {res['wall_s']:>7.1f} "
                f"{'/'.join(f'{m:.2f}' for m in ms):>15} {over:>+10.1f}% {cpu_col:>13} "
                f"{col('queued'):>6} {col('unacked'):>7} {col('reports_dropped'):>7} {mem:>26}"
            )
    print(
        "\nmedian over runs of the ranks' median step ms and the change against no agent; the ranks' process CPU"
        " per step; the collector's CPU per step:"
    )
    base_cpu = statistics.median(x["cpu_ms"] for res in results["no agent"] for x in res["ranks"])
    for case in cases:
        ms = statistics.median(x["median_ms"] for res in results[case] for x in res["ranks"])
        cpu = statistics.median(x["cpu_ms"] for res in results[case] for x in res["ranks"])
        coll = [res["collector_cpu_ms"] for res in results[case] if res["collector_cpu_ms"] is not None]
        print(
            f"  {case:10} {ms:7.2f} ms  {(ms / base - 1) * 100:+6.1f}%   rank CPU {cpu:6.2f} ms/step "
            f"({(cpu / base_cpu - 1) * 100:+6.1f}%)"
            + (f"   collector CPU {statistics.median(coll):.2f} ms/step (both ranks' reports)" if coll else "")
        )


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.argv.remove("--worker")
        worker(sys.argv[1:])
    else:
        main()
