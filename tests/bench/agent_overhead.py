"""What tracking costs a training step: plain vs the seed ModuleTracker vs modtrack.

One thread, one fresh process per (model, mode), rounds interleaved so that machine noise hits every mode
alike. Modes: plain (no tracker), seed (torch.utils.module_tracker), hooks (modtrack's ModuleTracker alone, as
`agent.track()` builds it: seed_parents=False; nothing consumes the steps), parity (ModuleTracker() as a drop-in
for the seed: `parents` kept in backward too) and agent (`agent.track()` streaming to a healthy collector on this
machine, as `python -m modtrack.agent` runs it: steps aggregated, encoded and sent by the sender). Sampled mode,
on request (--modes ...,sampled,unsampled): sampled is hooks with module detail every --sample-every steps; unsampled is
hooks with no step detailed after the warm-up (what a step without detail costs). Mode sender (no collector
needed): hooks whose steps the agent's sender thread aggregates (and, on CUDA, resolves the events of) as it does
while no collector answers; nothing is encoded or sent.

Per step it measures the training thread's CPU time (median), the garbage collector's young collections (what
the hooks allocate shows there), and the process's CPU time over all threads
(total over the timed steps, sender and gRPC threads included, waiting until the collector acked the last
step), and the collector's own CPU. It prints every ratio the agent is held to:
- training-thread overhead agent / seed (target <= 0.5 on the transformers models, <= 0.3 on MLP-200);
- agent CPU over all threads / hooks-only CPU (target <= 1.2): the training thread's overhead plus the CPU of
  every other thread (sender, gRPC; /proc/self/task/*/schedstat, ns), against the hooks-only overhead; also as
  process CPU deltas (coarser: the training thread's noise between processes is in it).

    python tests/bench/agent_overhead.py [--rounds 5] [--steps 60] [--models mlp200,llama,gpt2,bert]
                                         [--baseline-tree DIR]

--paired measures instead in ONE process per model, so that what differs between processes (memory layout,
which core, the allocator's state, a neighbour's load in that second) cannot differ between modes: short
blocks of steps with the seed tracker entered, modtrack's entered, modtrack's feeding a sender that streams to
a healthy collector (mode agent), and nothing entered (plain), interleaved in a new random order every round.
Each block starts with one untimed step (the first step after entering installs the hooks). Per mode: the
median training-thread CPU time per step over all rounds; the ratios with a bootstrap over rounds (5th-95th
percentile). The agent's other threads (sender, gRPC) are charged all their CPU over the whole run, also while
other modes run (an upper bound), divided by the steps the agent tracked:

    python tests/bench/agent_overhead.py --paired [--rounds 40] [--block 4] [--models ...] [--modes ...]

It also prints what keeping the rank's position (agent/position.py, for hung jobs) costs per module
call, timed in the same processes; --baseline-tree DIR (an older checkout) adds a mode "baseline":
modtrack's ModuleTracker as DIR has it, interleaved with the others (with --paired: built as hooks is, in the
same process, its agent package copied under another name).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("plain", "seed", "hooks", "agent")
SAMPLED_MODES = ("sampled", "unsampled")
EXTRA_MODES = (*SAMPLED_MODES, "sender")
BASELINE_SHIM = os.path.join(tempfile.gettempdir(), f"modtrack-bench-baseline-{os.getuid()}")
# --paired --baseline-tree: the older agent as the package `modtrack_baseline.agent`, importable beside ours
PAIRED_BASELINE = os.path.join(tempfile.gettempdir(), f"modtrack-bench-paired-baseline-{os.getuid()}")
MODELS = ("mlp200", "llama", "gpt2", "bert", "transformer", "gpt2small", "tinygpt")
TARGET_VS_SEED = {"mlp200": 0.3, "llama": 0.5, "gpt2": 0.5, "bert": 0.5}
TARGET_CPU = 1.2
VOCAB, SEQ, BATCH = 1000, 64, 4
# GPT-2 small (transformers' default GPT2Config, 124M parameters), for a GPU: a step of ~100 ms there
GPT2_SMALL_BATCH, GPT2_SMALL_SEQ = 8, 512


def build(model: str, device: str = "cpu"):
    """(module, loss function) of one benchmark model on `device`, its inputs too; random init, nothing downloaded."""
    import torch
    from torch import nn

    if model == "mlp200":
        net = nn.Sequential(*[m for _ in range(200) for m in (nn.Linear(64, 64), nn.ReLU())]).to(device)
        x = torch.randn(32, 64, device=device)
        return net, lambda: net(x).sum()
    if model == "tinygpt":  # the model of examples/train.py, as the 2-rank step benchmark (fail_open.py) runs it
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        import train

        net = train.TinyGPT(128, 128, 4, 2, 32).to(device)
        tokens = torch.randint(0, 128, (8, 32), device=device)
        return net, lambda: nn.functional.cross_entropy(net(tokens).reshape(-1, 128), tokens.reshape(-1))
    if model == "transformer":

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                layer = nn.TransformerEncoderLayer(256, 4, batch_first=True)
                self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
                self.head = nn.Linear(256, 10)

            def forward(self, x):
                return self.head(self.encoder(x))

        net = Encoder().to(device)
        x = torch.randn(8, 128, 256, device=device)
        return net, lambda: net(x).sum()
    import transformers as tf

    tf.logging.set_verbosity_error()
    common = {"vocab_size": VOCAB, "max_position_embeddings": SEQ}
    if model == "llama":
        net = tf.LlamaForCausalLM(
            tf.LlamaConfig(
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                **common,
            )
        )
    elif model == "gpt2":
        net = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, vocab_size=VOCAB))
    elif model == "gpt2small":
        net = tf.GPT2LMHeadModel(tf.GPT2Config()).to(device)
        ids = torch.randint(0, net.config.vocab_size, (GPT2_SMALL_BATCH, GPT2_SMALL_SEQ), device=device)
        return net, lambda: net(input_ids=ids, labels=ids).loss
    elif model == "bert":
        net = tf.BertForMaskedLM(
            tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, **common)
        )
    else:
        raise ValueError(model)
    net = net.to(device)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    return net, lambda: net(input_ids=ids, labels=ids).loss


def other_threads_cpu_ns() -> int:
    """CPU time of every thread of this process but the training (main) thread: the sender's, gRPC's."""
    main = threading.main_thread().native_id
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != main:
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass  # the thread ended meanwhile
    return total


def wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return False


def child(
    model: str, mode: str, steps: int, warmup: int, cpu_time: bool, device: str, collector: str, sample_every: int = 10
) -> dict:
    """Runs in its own process: time `steps` training steps."""
    import contextlib
    import gc

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net, loss_fn = build(model, device)
    cuda = device.startswith("cuda")
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    calls = [0]

    def count(mod, args):
        calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    loss_fn().backward()
    handle.remove()
    tracking = None
    if mode == "seed":
        from torch.utils.module_tracker import ModuleTracker

        ctx = ModuleTracker()
    elif mode in ("hooks", "parity"):
        from modtrack.agent import ModuleTracker

        ctx = ModuleTracker(seed_parents=mode == "parity")
    elif mode in SAMPLED_MODES:
        from modtrack.agent import ModuleTracker

        ctx = ModuleTracker(seed_parents=False)
        ctx.set_sampling(sample_every if mode == "sampled" else 10**9)  # unsampled: only step 0, in the warm-up
    elif mode == "sender":
        from modtrack.agent import ModuleTracker
        from modtrack.agent.identity import identity_from_env
        from modtrack.agent.transport import Transport

        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from harness.ports import free_port

        idle_sender = Transport(f"127.0.0.1:{free_port()}", identity_from_env("bench"), backoff_initial_s=60).start()
        ctx = ModuleTracker(on_step=idle_sender.submit, seed_parents=False)
    elif mode == "baseline":
        sys.path.insert(0, BASELINE_SHIM)
        from modtrack.agent import ModuleTracker

        ctx = ModuleTracker()
    else:
        ctx = contextlib.nullcontext()
    # CPU time of this (only) thread: other processes on a shared machine do not inflate it.
    clock = time.thread_time if cpu_time and not cuda else time.perf_counter

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()  # the step's GPU work is part of the step

    with ctx:
        if mode == "agent":
            from modtrack.agent.api import track

            tracking = track(collector, f"bench-{model}-{os.getpid()}", clock="auto")
        for _ in range(warmup):
            train_step()
        transport = tracking.transport if tracking is not None else None
        if transport is not None and not wait_until(
            lambda: transport.connected and transport.stats["unacked"] == 0 and transport.stats["queued"] == 0, 30
        ):
            raise SystemExit("the collector did not take the warm-up steps")
        times = []
        young0 = gc.get_stats()[0]["collections"]
        cpu0, others0 = time.process_time(), other_threads_cpu_ns()
        for _ in range(steps):
            t0 = clock()
            train_step()
            times.append(clock() - t0)
        if transport is not None:  # the sender's work for these steps is part of their cost
            last = warmup + steps - 1
            if not wait_until(lambda: transport.stats["acked_step"] >= last, 30):
                raise SystemExit("the collector did not ack the timed steps")
        cpu, others = time.process_time() - cpu0, other_threads_cpu_ns() - others0
        young = gc.get_stats()[0]["collections"] - young0
        stats = transport.stats if transport is not None else {}
    if tracking is not None:
        tracking.close()
    out = {
        "median_ms": statistics.median(times) * 1e3,
        "mean_ms": statistics.fmean(times) * 1e3,  # sampled mode: 1 step in N costs the full hooks
        "process_cpu_ms": cpu / steps * 1e3,
        "other_threads_ms": others / steps / 1e6,
        "calls": calls[0],
        "young_gcs": young / steps,
        "agent": stats,
    }
    if mode == "hooks":
        out["position_ns_per_call"] = position_cost_ns()
    return out


PAIRED_MODES = ("plain", "seed", "hooks", "parity", "agent")


def paired_child(model: str, modes: list[str], rounds: int, block: int, collector: str) -> dict:
    """Runs in its own process: every mode of `modes` in the same process, in blocks of `block` timed steps,
    the blocks of each round in a random order. Returns each mode's step times (ns), grouped by round."""
    import contextlib
    import gc
    import random

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net, loss_fn = build(model)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    transport = None
    contexts: dict = {}
    for mode in modes:
        if mode == "plain":
            contexts[mode] = contextlib.nullcontext()
        elif mode == "seed":
            from torch.utils.module_tracker import ModuleTracker as SeedTracker

            contexts[mode] = SeedTracker()
        elif mode in ("hooks", "parity"):
            from modtrack.agent import ModuleTracker

            contexts[mode] = ModuleTracker(seed_parents=mode == "parity")
        elif mode == "agent":  # what agent.track() wires: a tracker whose steps a sender streams to a collector
            from modtrack.agent import ModuleTracker
            from modtrack.agent.identity import identity_from_env
            from modtrack.agent.transport import Transport

            transport = Transport(collector, identity_from_env(f"bench-paired-{model}-{os.getpid()}")).start()
            contexts[mode] = ModuleTracker(on_step=transport.submit, seed_parents=False)
        elif mode == "baseline":  # the older tree's tracker, as hooks builds it
            sys.path.insert(0, PAIRED_BASELINE)
            from modtrack_baseline.agent.tracker import ModuleTracker as BaselineTracker

            contexts[mode] = BaselineTracker(seed_parents=False)
        else:
            raise SystemExit(f"--paired has no mode {mode!r} (it has {', '.join(PAIRED_MODES)})")

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    for _ in range(3):
        train_step()
    if transport is not None:
        with contexts["agent"]:
            train_step()
        if not wait_until(lambda: transport.connected and transport.stats["acked_step"] >= 0, 30):
            raise SystemExit("the collector did not take the first step")
    clock = time.thread_time_ns
    times: dict = {mode: [] for mode in modes}
    agent_steps = 0
    young = dict.fromkeys(modes, 0)
    order = list(modes)
    rng = random.Random(1)
    others0 = other_threads_cpu_ns()
    for _ in range(rounds):
        rng.shuffle(order)
        for mode in order:
            block_times = []
            with contexts[mode]:
                train_step()  # untimed: the first step after entering installs the hooks
                gc0 = gc.get_stats()[0]["collections"]
                for _ in range(block):
                    t0 = clock()
                    train_step()
                    block_times.append(clock() - t0)
                young[mode] += gc.get_stats()[0]["collections"] - gc0
            times[mode].append(block_times)
            if mode == "agent":
                agent_steps += block + 1
    others = 0
    runs: dict = {}
    if transport is not None:
        tracker = contexts["agent"]

        def acked() -> bool:
            return transport.stats["acked_step"] >= tracker.counters["steps"] - 1

        if not wait_until(acked, 30):
            raise SystemExit("the collector did not ack the timed steps")
        others = other_threads_cpu_ns() - others0
        runs = continuous_runs(contexts, transport, train_step, acked, rng)
        transport.close()
    return {
        "times": times,
        "other_threads_ns_per_agent_step": others / agent_steps if agent_steps else 0.0,
        "young_gcs": {m: young[m] / (rounds * block) for m in modes},
        "runs": runs,
    }


def continuous_runs(contexts: dict, transport, train_step, acked, rng, runs: int = 3, steps: int = 40) -> dict:
    """The agent's CPU over all its threads as a job sees it: runs of `steps` steps in a row (the sender flushes
    every 0.25 s, so several steps share a message, as in a real job), hooks and agent alternating. An agent
    run is charged every other thread's CPU from its first step until the collector acked its last (the
    sender's and gRPC's idle wake-ups in that time included). Returns per mode the step times and, for agent,
    the other threads' CPU per step of each run."""
    out: dict = {"hooks": [], "agent": [], "agent_others_ns": []}
    order = ["hooks", "agent"]
    clock = time.thread_time_ns
    for _ in range(runs):
        rng.shuffle(order)
        for mode in order:
            with contexts[mode]:
                train_step()  # untimed: installs the hooks
                if mode == "agent" and not wait_until(acked, 30):
                    raise SystemExit("the collector did not ack the warm-up step")
                others0 = other_threads_cpu_ns()
                for _ in range(steps):
                    t0 = clock()
                    train_step()
                    out[mode].append(clock() - t0)
                if mode == "agent":
                    if not wait_until(acked, 30):
                        raise SystemExit("the collector did not ack the run's steps")
                    out["agent_others_ns"].append((other_threads_cpu_ns() - others0) / steps)
    return out


def paired_report(model: str, out: dict, modes: list[str], boot: int = 2000) -> None:
    """Median per mode over every timed step; ratios of overheads, with their bootstrap spread over rounds."""
    import random

    import numpy as np

    times = {m: np.asarray(out["times"][m], dtype=np.float64) / 1e6 for m in modes}  # rounds x block, ms
    med = {m: float(np.median(t)) for m, t in times.items()}
    plain = med["plain"]
    n_rounds = len(times["plain"])
    rng = random.Random(2)
    picks = [[rng.randrange(n_rounds) for _ in range(n_rounds)] for _ in range(boot)]

    def spread(num: str, den: str | None) -> tuple[float, float, float]:
        """(ratio, 5th, 95th percentile) of overhead(num) / overhead(den) (den None: / plain step)."""

        def ratio(rows) -> float:
            p = float(np.median(times["plain"][rows]))
            top = float(np.median(times[num][rows])) - p
            bottom = p if den is None else float(np.median(times[den][rows])) - p
            return top / bottom if bottom > 0 else float("nan")

        samples = np.asarray([ratio(rows) for rows in picks])
        return ratio(list(range(n_rounds))), float(np.nanpercentile(samples, 5)), float(np.nanpercentile(samples, 95))

    print(f"{model}: {n_rounds} rounds x {times['plain'].shape[1]} steps per mode, one process")
    for m in modes:
        print(
            f"  {m:<6} median {med[m]:8.3f} ms/step  overhead {med[m] - plain:+7.3f} ms  "
            f"young GCs/step {out['young_gcs'][m]:.1f}"
        )
    target = TARGET_VS_SEED.get(model)
    for m in ("hooks", "parity", "agent", "baseline"):
        if m in modes and "seed" in modes:
            r, lo, hi = spread(m, "seed")
            print(
                f"  {model}: {m}/seed training-thread overhead ratio = {r:.2f} [{lo:.2f}, {hi:.2f}]"
                + (f" (target <= {target})" if target else "")
            )
    if "baseline" in modes and "hooks" in modes:
        r, lo, hi = spread("hooks", "baseline")
        print(f"  {model}: hooks/baseline training-thread overhead ratio = {r:.2f} [{lo:.2f}, {hi:.2f}]")
    for m in ("seed", "hooks", "parity", "agent", "baseline"):
        if m in modes:
            r, lo, hi = spread(m, None)
            print(f"  {model}: {m} overhead = {100 * r:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] of the plain step")
    if "agent" in modes and "hooks" in modes:
        others = out["other_threads_ns_per_agent_step"] / 1e6
        r, lo, hi = spread("agent", "hooks")
        hooks_over = med["hooks"] - plain
        total = (med["agent"] - plain + others) / hooks_over if hooks_over > 0 else float("nan")
        print(
            f"  {model}: blocks: agent training thread / hooks = {r:.2f} [{lo:.2f}, {hi:.2f}]; sender and gRPC "
            f"threads {others:.3f} ms per agent step (all their CPU over the whole process, the other modes' "
            f"blocks included); agent CPU over all threads / hooks-only CPU = {total:.2f} (an upper bound)"
        )
    runs = out.get("runs") or {}
    if runs.get("agent"):
        hooks_ms = float(np.median(runs["hooks"])) / 1e6 - plain
        agent_ms = float(np.median(runs["agent"])) / 1e6 - plain
        others_ms = float(np.median(runs["agent_others_ns"])) / 1e6
        spread_others = ", ".join(f"{x / 1e6:.3f}" for x in runs["agent_others_ns"])
        print(
            f"  {model}: runs of {len(runs['agent']) // len(runs['agent_others_ns'])} steps in a row: training "
            f"thread hooks +{hooks_ms:.3f} ms, agent +{agent_ms:.3f} ms; sender and gRPC threads {others_ms:.3f} ms "
            f"per step (runs: {spread_others}); agent CPU over all threads / hooks-only CPU = "
            f"{(agent_ms + others_ms) / hooks_ms if hooks_ms > 0 else float('nan'):.2f} (the training thread's noise "
            "between runs is in it)"
        )
        # the training thread from the paired blocks (robust), the other threads from the runs in a row
        block_hooks, block_agent = med["hooks"] - plain, med["agent"] - plain
        if block_hooks > 0:
            print(
                f"  {model}: agent CPU over all threads / hooks-only CPU = {1 + others_ms / block_hooks:.2f} "
                f"(target <= {TARGET_CPU}): the hooks' overhead (blocks) plus the sender and gRPC threads (runs in a "
                f"row), over the hooks' overhead; with the agent's own training-thread overhead (blocks) instead: "
                f"{(block_agent + others_ms) / block_hooks:.2f}"
            )


def paired_main(args) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from harness.collector_process import env

    models, modes = args.models.split(","), args.modes.split(",")
    if "plain" not in modes:
        modes.insert(0, "plain")
    if args.baseline_tree:
        make_paired_baseline(os.path.abspath(args.baseline_tree))
        modes.append("baseline")
    with tempfile.TemporaryDirectory() as tmp:
        server = collector_for(modes, tmp)
        try:
            for model in models:
                cmd = [sys.executable, __file__, "--paired-child", model, "--modes", ",".join(modes)]
                cmd += ["--rounds", str(args.rounds), "--block", str(args.block)]
                if server is not None:
                    cmd += ["--collector", server.grpc_target]
                    before = proc_cpu_s(server.proc.pid)
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env(OMP_NUM_THREADS="1"))
                out = json.loads(done.stdout.strip().splitlines()[-1])
                paired_report(model, out, modes)
                if server is not None:
                    agent_steps = args.rounds * (args.block + 1) + 1
                    print(
                        f"  {model}: collector CPU {(proc_cpu_s(server.proc.pid) - before) * 1e3 / agent_steps:.3f}"
                        " ms per agent step (its idle wake-ups during the other modes included)",
                        flush=True,
                    )
        finally:
            if server is not None:
                server.kill()


def position_cost_ns() -> float:
    """The position writes the tracker's hooks add to one module call (pre + post hook, as in
    agent/tracker.py), timed alone: best of 5 runs of 200,000."""
    import timeit

    from modtrack.agent.position import Position

    setup = "p = Position(); mid = 7; row = [7, 0]; stack = [(0, [3, 0])]"
    body = (
        "position = p; position.module = mid; position.phase = row[1]; position.entered = row\n"
        "position = p\nif stack:\n    caller = stack[-1][1]; position.module = caller[0]; "
        "position.phase = caller[1]"
    )
    empty = timeit.repeat("pass", setup, repeat=5, number=200_000, globals={"Position": Position})
    timed = timeit.repeat(body, setup, repeat=5, number=200_000, globals={"Position": Position})
    return (min(timed) - min(empty)) / 200_000 * 1e9


def machine_line() -> str:
    """What the ratios depend on beyond the code: the same tracker read 0.32x and 0.46x the seed on MLP-200 on two
    machines of one kind, whose thread CPU reads cost 273 and 549 ns. Printed first: every table says where it ran."""
    import platform
    import timeit

    def ns(call: str) -> float:
        return min(timeit.repeat(call, "import time", repeat=5, number=100_000)) / 100_000 * 1e9

    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; per read: time.thread_time_ns {ns('time.thread_time_ns()'):.0f} ns,"
        f" time.perf_counter_ns {ns('time.perf_counter_ns()'):.0f} ns"
    )


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per process (a quarter for 'transformer')")
    ap.add_argument("--models", default="mlp200,llama,gpt2,bert")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--wall", action="store_true", help="time steps by wall clock, not thread CPU time")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (then steps are timed by wall clock)")
    ap.add_argument("--baseline-tree", help="a checkout of an older modtrack: adds the mode 'baseline'")
    ap.add_argument("--sample-every", type=int, default=10, help="mode 'sampled': module detail every N steps")
    ap.add_argument("--paired", action="store_true", help="every mode in one process per model (see above)")
    ap.add_argument("--block", type=int, default=4, help="--paired: timed steps per block")
    ap.add_argument("--paired-child", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--collector", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paired_child:
        out = paired_child(args.paired_child, args.modes.split(","), args.rounds, args.block, args.collector)
        print(json.dumps(out))
        return
    if not args.child:
        print(machine_line(), flush=True)
    if args.paired:
        paired_main(args)
        return
    if args.child:
        print(
            json.dumps(
                child(
                    args.child[0],
                    args.child[1],
                    args.steps,
                    warmup=10,
                    cpu_time=not args.wall,
                    device=args.device,
                    collector=args.collector,
                    sample_every=args.sample_every,
                )
            )
        )
        return
    import tempfile

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from harness.collector_process import env

    models, modes = args.models.split(","), args.modes.split(",")
    if args.baseline_tree:
        make_baseline_shim(os.path.abspath(args.baseline_tree))
        modes.append("baseline")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = collector_for(modes, tmp)
        try:
            for r in range(args.rounds):
                for model in models:
                    steps = args.steps if model != "transformer" else max(5, args.steps // 4)
                    for mode in modes:
                        cmd = [
                            sys.executable,
                            __file__,
                            "--steps",
                            str(steps),
                            "--child",
                            model,
                            mode,
                            "--device",
                            args.device,
                            "--sample-every",
                            str(args.sample_every),
                        ] + (["--wall"] if args.wall else [])
                        if mode == "agent":
                            cmd += ["--collector", server.grpc_target]
                            before = proc_cpu_s(server.proc.pid)
                        out = subprocess.run(
                            cmd, check=True, capture_output=True, text=True, env=env(OMP_NUM_THREADS="1")
                        ).stdout
                        res = json.loads(out.strip().splitlines()[-1])
                        if mode == "agent":  # includes the collector's Hello and warm-up steps: an upper bound
                            res["collector_cpu_ms"] = (proc_cpu_s(server.proc.pid) - before) * 1e3 / steps
                        results.setdefault((model, mode), []).append(res)
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            if server is not None:
                server.kill()
    report(results, models, modes, args)


def report(results: dict, models: list[str], modes: list[str], args) -> None:
    timer = "wall" if args.wall or args.device != "cpu" else "thread CPU"

    def med(model, mode, key):
        return statistics.median(x[key] for x in results[(model, mode)])

    print(
        f"device {args.device}; median over {args.rounds} rounds of: the training thread's median {timer} time "
        f"per step, the process CPU per step (all threads)"
    )
    print(
        f"{'model':<12} {'mode':<6} {'step ms':>8} {'overhead':>9} {'us/call':>8} {'proc cpu ms':>12} "
        f"{'overhead':>9} {'other threads ms':>17} {'young GCs':>9}  (calls/step)"
    )
    for model in models:
        calls = results[(model, modes[0])][0]["calls"]
        plain, plain_cpu = med(model, "plain", "median_ms"), med(model, "plain", "process_cpu_ms")
        over, cpu_over, others = {}, {}, {}
        for mode in modes:
            ms, cpu = med(model, mode, "median_ms"), med(model, mode, "process_cpu_ms")
            others[mode] = med(model, mode, "other_threads_ms")
            over[mode], cpu_over[mode] = ms - plain, cpu - plain_cpu
            young = med(model, mode, "young_gcs") if "young_gcs" in results[(model, mode)][0] else float("nan")
            print(
                f"{model:<12} {mode:<6} {ms:8.3f} {over[mode]:9.3f} {over[mode] * 1e3 / calls:8.1f} "
                f"{cpu:12.3f} {cpu_over[mode]:9.3f} {others[mode]:17.3f} {young:9.1f}  ({calls})"
            )
        target = TARGET_VS_SEED.get(model)
        for mode in ("hooks", "agent"):
            if mode in over and over.get("seed", 0) > 0:
                print(
                    f"{model}: {mode}/seed training-thread overhead ratio = {over[mode] / over['seed']:.2f}"
                    + (f" (target <= {target})" if target else "")
                )
        if "agent" in over:
            print(f"{model}: agent overhead = {100 * over['agent'] / plain:.2f} % of the plain step")
        if "sender" in over and over.get("seed", 0) > 0:
            print(f"{model}: sender/seed training-thread overhead ratio = {over['sender'] / over['seed']:.2f}")
        for mode in ("seed", "hooks", "sender"):
            if mode in over:
                print(f"{model}: {mode} overhead = {100 * over[mode] / plain:.2f} % of the plain step ({plain:.1f} ms)")
        for mode in SAMPLED_MODES:
            if mode in over:  # mean step times: the median would hide the 1 step in N that has detail
                every = f"detail every {args.sample_every} steps" if mode == "sampled" else "no step with detail"
                plain_mean = med(model, "plain", "mean_ms")
                mean_over = {m: med(model, m, "mean_ms") - plain_mean for m in (mode, "hooks") if (model, m) in results}
                versus = mean_over.get("hooks", 0)
                print(
                    f"{model}: {mode} ({every}) mean overhead = {mean_over[mode]:.3f} ms/step = "
                    f"{100 * mean_over[mode] / plain_mean:.2f} % of the plain step (process CPU "
                    f"{cpu_over[mode]:+.3f} ms/step)"
                    + (f", {mean_over[mode] / versus:.3f} x the full-detail hooks" if versus > 0 else "")
                )
        position = [x["position_ns_per_call"] for x in results.get((model, "hooks"), []) if "position_ns_per_call" in x]
        if position:
            position_ms = statistics.median(position) * calls / 1e6
            print(
                f"{model}: position updates {statistics.median(position):.0f} ns/call = {position_ms:.3f} ms/step = "
                f"{100 * position_ms / plain:.2f} % of the plain step"
            )
        if "baseline" in over:
            print(
                f"{model}: hooks - baseline = {over['hooks'] - over['baseline']:+.3f} ms/step "
                f"({100 * (over['hooks'] - over['baseline']) / plain:+.2f} % of the plain step)"
            )
        if "agent" in cpu_over and over.get("hooks", 0) > 0:
            # the agent's CPU: what it adds to the training thread, plus everything its other threads use
            agent_cpu = over["agent"] + others["agent"]
            print(
                f"{model}: agent CPU over all threads / hooks-only CPU = {agent_cpu / over['hooks']:.2f} "
                f"(target <= {TARGET_CPU}; training thread +{over['agent']:.3f} ms, sender and gRPC threads "
                f"{others['agent']:.3f} ms, hooks alone {over['hooks']:.3f} ms per step); by process CPU "
                f"{cpu_over['agent'] / max(cpu_over['hooks'], 1e-9):.2f}; collector CPU "
                f"{med(model, 'agent', 'collector_cpu_ms'):.3f} ms/step"
            )


def collector_for(modes: list[str], tmp: str):
    """A healthy collector on this machine for mode 'agent' (None without it), its data and log in tmp."""
    from harness.collector_process import CollectorProcess

    if "agent" not in modes:
        return None
    return CollectorProcess(os.path.join(tmp, "data"), log_path=os.path.join(tmp, "collector.log"))


def make_paired_baseline(tree: str) -> None:
    """PAIRED_BASELINE/modtrack_baseline/agent: a copy of the baseline checkout's agent whose imports of
    `modtrack.agent` name the copy (its protos are ours: the tracker only reads phase names there)."""
    import shutil

    package = os.path.join(PAIRED_BASELINE, "modtrack_baseline")
    shutil.rmtree(PAIRED_BASELINE, ignore_errors=True)
    shutil.copytree(os.path.join(tree, "agent"), os.path.join(package, "agent"), ignore=shutil.ignore_patterns("*.pyc"))
    open(os.path.join(package, "__init__.py"), "w").close()
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(text.replace("modtrack.agent", "modtrack_baseline.agent"))


def make_baseline_shim(tree: str) -> None:
    """BASELINE_SHIM/modtrack/{agent,collector,protos} -> the baseline checkout's folders."""
    import shutil

    shutil.rmtree(BASELINE_SHIM, ignore_errors=True)
    os.makedirs(os.path.join(BASELINE_SHIM, "modtrack"))
    for part in ("agent", "collector", "protos"):
        os.symlink(os.path.join(tree, part), os.path.join(BASELINE_SHIM, "modtrack", part))


if __name__ == "__main__":
    main()
