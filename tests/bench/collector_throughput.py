"""Collector throughput: module x phase records per second, in-process and over loopback gRPC.

In-process (no network): serialized StepReports of R ranks go through the collector's own
path (decode, validate and remap, merge, build the rank x column matrix, detect), one core.

    python tests/bench/collector_throughput.py                 # in-process, 1,024 x 500 x 2
    python tests/bench/collector_throughput.py --store         # + the SQLite write, on the writer's path
    python tests/bench/collector_throughput.py --loopback      # + a real collector, 2 minutes
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from modtrack.collector.ingest.parse import RankStream, parse_report
from modtrack.collector.pipeline.detector import Detector
from modtrack.collector.pipeline.merge import Merger, build_matrix
from modtrack.collector.sim.cluster_model import ClusterModel
from modtrack.collector.sim.simulate import parse_straggler, report
from modtrack.collector.store.sqlite import Store
from modtrack.protos import modtrack_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared harness
from harness.collector_process import CollectorProcess
from harness.evaluated import wait_evaluated


def in_process(ranks: int, modules: int, steps: int, store_dir: str | None = None) -> dict:
    model = ClusterModel(ranks=ranks, modules=modules, seed=0, noise_pool=4)
    model.stragglers = [parse_straggler(f"rank={ranks - 1},module=3,phase=backward,slowdown=1.5,onset=0", model)]
    merger = Merger(watermark_s=1e9)
    state = merger.hello("bench", 0, ranks, model.hosts[0])
    for r in range(1, ranks):
        merger.hello("bench", r, ranks, model.hosts[r])
    ids, _, _ = state.module_ids(model.module_names)
    streams = [RankStream("bench", r, list(model.module_names), ids, None) for r in range(ranks)]
    detector = Detector("bench")
    matrices = [model.step(s) for s in range(min(steps, 8))]  # cycled: encoding is not measured
    wire = [[report(s, r, m, model, 10**9).SerializeToString() for r in range(ranks)] for s, m in enumerate(matrices)]
    t = {"decode+validate": 0.0, "merge+matrix": 0.0, "detect": 0.0}
    store = Store(store_dir) if store_dir else None
    if store:  # what the writer thread does per batch: BLOBs, one executemany, a FULL-sync commit
        t["store"] = 0.0
    records = 0
    episodes = []
    for s in range(steps):
        t0 = time.process_time()
        rows = []
        for r, data in enumerate(wire[s % len(wire)]):
            msg = pb.AgentMessage.FromString(data).report
            msg.step = s
            rows.append(parse_report(msg, streams[r], state.module_ids))
        t1 = time.process_time()
        for row in rows:
            merger.add(row)
        (ready,), _ = merger.due(time.monotonic())
        matrix = build_matrix(state, ready.step, ready.rows)
        t2 = time.process_time()
        episodes += detector.observe(matrix)
        t3 = time.process_time()
        t["decode+validate"] += t1 - t0
        t["merge+matrix"] += t2 - t1
        t["detect"] += t3 - t2
        if store:
            t4 = time.process_time()
            store.conn().execute("BEGIN IMMEDIATE")
            store.insert_steps(rows)
            store.conn().execute("COMMIT")
            t["store"] += time.process_time() - t4
        records += int(np.count_nonzero(~np.isnan(matrix.self_ms)))
    if store:
        store.close()
    total = sum(t.values())
    found = {(e.rank, e.module, e.phase) for e in episodes}
    return {
        "records": records,
        "cpu_s": t,
        "records_per_s": records / total,
        "per_step_s": total / steps,
        "found": found,
    }


def _histogram_quantile(text: str, name: str, q: float) -> float:
    buckets = [
        (float("inf") if le == "+Inf" else float(le), float(v))
        for le, v in re.findall(rf'{name}_bucket{{le="([^"]+)"}} ([0-9.e+]+)', text)
    ]
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    target = q * buckets[-1][1]
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= target:
            if bound == float("inf"):
                return lo_bound
            return lo_bound + (bound - lo_bound) * (target - lo_count) / max(count - lo_count, 1e-9)
        lo_bound, lo_count = bound, count
    return float("nan")


def _cpu_s(stat_path: str) -> float:
    """user + system CPU seconds of a process or thread, from its /proc stat file."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc(pid: int) -> tuple[float, int, float]:
    """(CPU seconds, RSS bytes, CPU seconds of the main thread: the event loop) of a process."""
    cpu = _cpu_s(f"/proc/{pid}/stat")
    loop_cpu = _cpu_s(f"/proc/{pid}/task/{pid}/stat")
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss, loop_cpu


def loopback(ranks: int, modules: int, seconds: int, step_s: float, procs: int) -> dict:
    steps = int(seconds / step_s)
    with tempfile.TemporaryDirectory() as tmp:
        server = CollectorProcess(Path(tmp) / "data", "--log-level", "WARNING")
        try:
            grpc_addr, http_addr, pid = server.grpc_target, server.http_addr, server.proc.pid
            cpu0, _, _ = _proc(pid)
            t0 = time.monotonic()
            sim = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "modtrack.collector.sim.simulate",
                    "--collector",
                    grpc_addr,
                    "--job",
                    "bench",
                    "--ranks",
                    str(ranks),
                    "--modules",
                    str(modules),
                    "--steps",
                    str(steps),
                    "--step-s",
                    str(step_s),
                    "--procs",
                    str(procs),
                    "--start-delay-s",
                    "15",
                    "--straggler",
                    "rank=7,module=3,phase=backward,slowdown=1.5,onset=20",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            peak_rss, samples = 0, []
            while sim.poll() is None:
                time.sleep(1.0)
                cpu, rss, loop_cpu = _proc(pid)
                samples.append((time.monotonic(), cpu, loop_cpu))
                peak_rss = max(peak_rss, rss)
            sim_out = sim.stdout.read().strip()
            wait_evaluated(server.url, steps - 1, "bench", timeout=60)  # the verdicts on the last steps are in
            metrics = urllib.request.urlopen(f"http://{http_addr}/metrics", timeout=30).read().decode()
            stragglers = (
                urllib.request.urlopen(f"http://{http_addr}/api/v1/jobs/bench/stragglers", timeout=30).read().decode()
            )
            cpu1, rss, _ = _proc(pid)
        finally:
            server.terminate()
    # CPU over the streaming part only (after everyone connected): the middle of the run.
    mid = [s for s in samples if s[0] - t0 > 20]
    span = (mid[-1][0] - mid[0][0]) if len(mid) > 2 else float("nan")
    busy = (mid[-1][1] - mid[0][1]) / span if len(mid) > 2 else float("nan")
    loop_busy = (mid[-1][2] - mid[0][2]) / span if len(mid) > 2 else float("nan")
    ingested = re.search(r"^modtrack_ingest_records(?:_total)? ([0-9.e+]+)", metrics, re.M)
    reports = float(ingested.group(1)) if ingested else float("nan")
    return {
        "steps": steps,
        "simulator": sim_out,
        "reports_ingested": reports,
        "records_per_s": reports * modules * 2 / (steps * step_s),
        "collector_cpu_cores": busy,
        "event_loop_thread_cores": loop_busy,
        "collector_cpu_s_total": cpu1 - cpu0,
        "rss_peak_mb": peak_rss / 2**20,
        "lag_p50_s": _histogram_quantile(metrics, "modtrack_verdict_lag_seconds", 0.5),
        "lag_p99_s": _histogram_quantile(metrics, "modtrack_verdict_lag_seconds", 0.99),
        "straggler_found": '"rank": 7' in stragglers and "Net.layers.3" in stragglers,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=1024)
    ap.add_argument("--modules", type=int, default=500)
    ap.add_argument("--steps", type=int, default=20, help="in-process steps")
    ap.add_argument(
        "--store", action="store_true", help="in-process: also write each step to a SQLite store in a temporary dir"
    )
    ap.add_argument("--loopback", action="store_true", help="also run a real collector over loopback")
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--step-s", type=float, default=1.0)
    ap.add_argument("--procs", type=int, default=4, help="simulator client processes")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as store_dir:
        r = in_process(a.ranks, a.modules, a.steps, store_dir if a.store else None)
    print(f"in-process, one core: {a.ranks} ranks x {a.modules} modules x 2 phases, {a.steps} steps")
    print(f"{'stage':20s}{'cpu s/step':>12s}{'records/s':>16s}")
    per = r["records"] / a.steps
    for stage, cpu in r["cpu_s"].items():
        print(f"{stage:20s}{cpu / a.steps:12.3f}{per / (cpu / a.steps):16,.0f}")
    print(f"{'total':20s}{r['per_step_s']:12.3f}{r['records_per_s']:16,.0f}")
    print(f"injected straggler found: {(7, 'Net.layers.3', 'backward') in r['found']}")
    if a.loopback:
        lb = loopback(a.ranks, a.modules, a.seconds, a.step_s, a.procs)
        print(
            f"\nloopback: {a.ranks} ranks x {a.modules} modules x 2 phases, 1 step / {a.step_s} s, "
            f"{a.seconds} s, {a.procs} simulator processes"
        )
        for k, v in lb.items():
            print(f"  {k:24s} {v:,.3f}" if isinstance(v, float) else f"  {k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
