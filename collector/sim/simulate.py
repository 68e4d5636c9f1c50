"""`python -m modtrack.collector.sim.simulate`: a fake synchronous job streaming to a real collector over gRPC.

N ranks as real gRPC clients (several processes, each holding many streams), each sending a
Hello with the module table and then one columnar StepReport per step, figures from the
cluster model (collector/sim/cluster_model.py): heavy-tailed noise, DDP-style sync wait, optional
pipeline stages, injected stragglers. Every process builds the same model from the same seed,
so all ranks agree on who waited for whom without talking to each other.

    python -m modtrack.collector.sim.simulate --collector 127.0.0.1:50051 --ranks 64 --modules 50 --steps 300 \\
        --straggler rank=5,module=7,phase=backward,slowdown=1.5,onset=50,end=200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time

import grpc
import numpy as np

from modtrack.collector.records import PHASE_IDS
from modtrack.collector.sim.cluster_model import ClusterModel, Straggler
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc

PHASES = {name: PHASE_IDS[name] for name in ("forward", "backward")}  # what the model times


def parse_straggler(text: str, model: ClusterModel) -> Straggler:
    """`rank=R|host=H,module=M|all,phase=forward|backward,slowdown=X,onset=S[,end=S]`."""
    f = dict(part.split("=", 1) for part in text.split(","))
    if "host" in f:
        ranks, host = model.host_ranks(f["host"]), f["host"]
        if not ranks:
            raise ValueError(f"no ranks on host {f['host']!r}")
    else:
        ranks, host = [int(f["rank"])], None
    module = -1 if f.get("module", "all") == "all" else int(f["module"])
    return Straggler(
        ranks,
        module,
        PHASES[f.get("phase", "forward")],
        float(f["slowdown"]),
        int(f.get("onset", 0)),
        int(f.get("end", 10**12)),
        host,
    )


def build_model(a) -> ClusterModel:
    model = ClusterModel(
        ranks=a.ranks,
        ranks_per_host=a.ranks_per_host,
        modules=a.modules,
        stages=a.stages,
        sigma=a.sigma,
        seed=a.seed,
        noise_pool=a.noise_pool,
    )
    model.stragglers = [parse_straggler(s, model) for s in a.straggler]
    return model


def report(step: int, rank: int, m, model: ClusterModel, step_ns: int) -> pb.AgentMessage:
    """One rank's row of a step as the agent would send it (times in ns on its own clock)."""
    row = m.self_ms[rank]
    start = step * step_ns
    wall = int(m.wall_ms[rank] * 1e6)
    wait = int(m.sync_wait_ms[rank] * 1e6)
    r = pb.StepReport(
        step=step,
        start_ns=start,
        end_ns=start + wall,
        forward_ns=int(m.forward_ms[rank] * 1e6),
        backward_ns=int(m.backward_ms[rank] * 1e6),
        backward_tail_ns=wait,
        data_ns=max(wall - int(np.nansum(row) * 1e6) - wait, 0),
    )
    for phase in PHASES.values():
        cols = np.nonzero(model.column_phase == phase)[0]
        ns = row[cols]
        ran = ~np.isnan(ns)
        ns = (ns[ran] * 1e6).astype(np.int64)
        ids = model.column_module[cols][ran]
        ends = (start + np.cumsum(ns)).tolist()
        ns_list = ns.tolist()
        r.phases.add(
            phase=phase,
            module_id=ids.tolist(),
            calls=[1] * len(ns_list),
            inclusive_ns=ns_list,
            self_ns=ns_list,
            first_start_ns=[e - d for e, d in zip(ends, ns_list)],
            last_end_ns=ends,
        )
    return pb.AgentMessage(report=r)


async def _run_ranks(a, ranks: list[int], t0: float) -> dict:
    model = build_model(a)
    metadata = (("authorization", f"Bearer {a.token}"),) if a.token else ()
    options = [("grpc.max_send_message_length", 64 << 20)]
    channel = grpc.aio.insecure_channel(a.collector, options=options)
    stub = pb_grpc.CollectorStub(channel)
    calls, acked = {}, dict.fromkeys(ranks, -1)

    async def drain(rank, call):
        async for msg in call:
            if msg.HasField("ack"):
                acked[rank] = msg.ack.step

    readers = []
    for rank in ranks:  # simulated GPU ranks: CUDA-event timing, so no CPU-clock floor applies
        call = stub.Stream(metadata=metadata)
        await call.write(
            pb.AgentMessage(
                hello=pb.Hello(
                    protocol_version=1,
                    job=a.job,
                    rank=rank,
                    local_rank=rank % a.ranks_per_host,
                    world_size=a.ranks,
                    group_rank=rank // a.ranks_per_host,
                    host=model.hosts[rank],
                    pid=rank,
                    agent_version="simulate",
                    clock_kind=pb.CLOCK_KIND_CUDA,
                    module_names=model.module_names,
                    session=f"sim-{a.seed}-{rank}",
                )
            )
        )
        calls[rank] = call
        readers.append(asyncio.create_task(drain(rank, call)))
    step_ns = int(a.step_s * 1e9) or 1
    late = 0
    for step in range(a.steps):
        delay = t0 + step * a.step_s - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif a.step_s > 0 and delay < -a.step_s:
            late += 1
        m = model.step(step)
        for rank in ranks:
            await calls[rank].write(report(step, rank, m, model, step_ns))
    for call in calls.values():
        await call.done_writing()
    try:
        await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), timeout=a.drain_s)
    except asyncio.TimeoutError:
        pass
    await channel.close()
    return {"ranks": len(ranks), "fully_acked": sum(v == a.steps - 1 for v in acked.values()), "late_steps": late}


def _process(a, ranks, t0, out) -> None:
    out.put(asyncio.run(_run_ranks(a, ranks, t0)))


def run(a) -> dict:
    """Run the simulated job to the end; returns how many ranks got every report acked."""
    t0 = time.time() + a.start_delay_s
    parts = [list(range(a.ranks))[i :: a.procs] for i in range(a.procs)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(a, part, t0, out), daemon=True) for part in parts if part]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=a.steps * a.step_s + a.start_delay_s + a.drain_s + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return {
        "ranks": sum(r["ranks"] for r in results),
        "fully_acked": sum(r["fully_acked"] for r in results),
        "late_steps": max(r["late_steps"] for r in results),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m modtrack.collector.sim.simulate", description=__doc__.splitlines()[0])
    ap.add_argument("--collector", required=True, help="HOST:PORT of the collector's gRPC port")
    ap.add_argument("--job", default="sim")
    ap.add_argument("--token", default="", help="bearer token, if the collector wants one")
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--ranks-per-host", type=int, default=8)
    ap.add_argument("--modules", type=int, default=50, help="modules per rank (x2 phases)")
    ap.add_argument("--stages", type=int, default=1, help="pipeline stages (disjoint modules)")
    ap.add_argument("--sigma", type=float, default=0.03, help="log-normal jitter of each module time")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--step-s", type=float, default=0.1, help="seconds between steps (0: as fast as possible)")
    ap.add_argument("--procs", type=int, default=2, help="client processes sharing the ranks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--noise-pool",
        type=int,
        default=8,
        help="reuse this many pre-drawn noise matrices (cheap steps for big jobs; 0: fresh)",
    )
    ap.add_argument(
        "--straggler",
        action="append",
        default=[],
        help="rank=R|host=H,module=M|all,phase=forward|backward,slowdown=X,onset=S[,end=S]",
    )
    ap.add_argument("--start-delay-s", type=float, default=1.0, help="time for every process to connect")
    ap.add_argument("--drain-s", type=float, default=30.0, help="how long to wait for the last acks")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        build_model(a)  # bad --straggler specs fail here, before any process starts
    except (ValueError, KeyError) as exc:
        print(f"error: bad --straggler: {exc}", file=sys.stderr)
        return 2
    result = run(a)
    print(json.dumps(result))
    return 0 if result["fully_acked"] == result["ranks"] else 1


if __name__ == "__main__":
    sys.exit(main())
