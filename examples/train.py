"""A small GPT-style language model trained with DDP (or FSDP) on synthetic tokens, with a straggler on demand.

    torchrun --nproc-per-node 4 examples/train.py --steps 40
    torchrun --nproc-per-node 4 -m modtrack.agent --collector 127.0.0.1:50051 examples/train.py \
        --slow-rank 2 --slow-module blocks.1.mlp --slow-phase backward --slow-ms 40 --slow-from-step 15

The fault injection busy-waits (slow compute, not sleep) on one rank: inside modules' forward, or
inside their backward through an autograd Function placed at each module's output (--slow-module
takes a comma-separated list), in every leaf module (--slow-phase whole), while loading the batch
(data: inside the DataLoader's fetch), in the training loop's own code between forward and backward (host), between
backward and the optimizer step (post: gradient clipping, `loss.item()`, logging) or after it (after: an EMA
update, logging), inside the optimizer
step (optimizer; with --optimizers 2, the second one's), or as a full garbage collection in --slow-module's
forward that takes about --slow-ms (gc: the rank keeps a heap of small objects sized for it). --slow-every N
makes it intermittent (one slow step in N), --slow-ramp-steps a gradual ramp, --slow-to-step a stop.
--fail-at-step S makes rank 0 fail once, in the first attempt, so that `torchrun --max-restarts 1` restarts
the job; --slow-attempt confines the fault to one attempt. --clip-grad-norm N clips the gradients after backward
(HF Trainer's default; under FSDP an all-reduce of their norm, where every rank waits for the last one).
--step-times FILE: every rank appends each step's wall time (the job's own measure of what a straggler costs,
independent of the agent) as JSON lines, with its rank.
It prints the same lines with or without the agent: loss is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, IterableDataset


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, context: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.activation_checkpointing = False

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # as transformers' gradient_checkpointing does: the block's call again in backward (its recompute)
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.ln_f(x))


def loop_code(args, ms: float) -> None:
    """The training loop's own slow code: computing (busy), or blocked on the rank's own I/O (--slow-blocking: a
    write to a slow file system, a logger's network call), which takes no CPU."""
    if args.slow_blocking:
        time.sleep(ms / 1000)
    else:
        busy_wait(ms)


def busy_wait(ms: float) -> None:
    """Burn `ms` of this thread's CPU time: a slow kernel, not an idle sleep.

    Counted in CPU time, so the injected compute is the same however many ranks share a core.
    """
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass


class _SlowBackward(torch.autograd.Function):
    """Identity forward; its backward burns time, inside the wrapped module's backward."""

    @staticmethod
    def forward(ctx, x, ms):
        ctx.ms = ms
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        busy_wait(ctx.ms)
        return grad, None


def gc_heap(ms: float) -> list:
    """Enough small tracked objects that one full collection walks them for about `ms` of CPU time: a rank whose
    heap makes every full collection long (caches, a tokenizer's tables, a dataset held as Python objects).

    What is alive now (torch's own objects, and those its first step imported: a full collection over them alone
    took ~100 ms on the development VM) is frozen first (`gc.freeze()`), so that the pause is the heap's, of the
    size asked for."""
    gc.freeze()
    heap: list = []
    chunk = 50_000
    took = 0.0
    while took < ms and len(heap) < 400 * chunk:  # at most ~20 M objects whatever the machine
        more = chunk if not took else max(chunk, int((ms - took) / (took / len(heap))))
        heap.extend([] for _ in range(more))
        took = max(_full_collection_ms() for _ in range(2))
    return heap


def _full_collection_ms() -> float:
    start = time.thread_time()
    gc.collect()
    return (time.thread_time() - start) * 1000


def slow_ms_now(args, progress: dict) -> float:
    """The busy wait this step asks for: 0 outside the slow steps, else --slow-ms (ramped, 1 in N)."""
    step = progress["step"]
    if step < args.slow_from_step or (args.slow_to_step is not None and step >= args.slow_to_step):
        return 0.0
    if args.slow_attempt is not None and progress["attempt"] != args.slow_attempt:
        return 0.0
    since = step - args.slow_from_step
    if args.slow_every > 1 and since % args.slow_every:
        return 0.0
    if args.slow_ramp_steps:
        return args.slow_ms * min(1.0, (since + 1) / args.slow_ramp_steps)
    return args.slow_ms


def slow_modules(model: nn.Module, args) -> list[nn.Module]:
    """The modules the fault goes in: the named ones, or every leaf module for a whole-rank fault."""
    if args.slow_phase == "whole":
        return [m for m in model.modules() if not list(m.children())]
    prefix = type(model).__name__ + "."
    return [model.get_submodule(name.strip().removeprefix(prefix)) for name in args.slow_module.split(",")]


def inject_slowness(model: nn.Module, args, progress: dict) -> None:
    """Wrap the modules' forward so that they are slow, in forward or backward, while the step is in range.

    A whole-rank fault spreads --slow-ms over every leaf module, half in forward, half in backward."""
    modules = slow_modules(model, args)
    share = 1.0 / (2 * len(modules)) if args.slow_phase == "whole" else 1.0
    for module in modules:
        original = module.forward

        def slow_forward(*a, _original=original, **kw):
            ms = slow_ms_now(args, progress) * share
            if args.slow_phase in ("forward", "whole") and ms and torch.is_grad_enabled():
                busy_wait(ms)
            if args.slow_phase == "gc" and ms and torch.is_grad_enabled():
                gc.collect()  # where a full collection strikes: while a forward allocates
            out = _original(*a, **kw)
            if args.slow_phase in ("backward", "whole") and ms and torch.is_grad_enabled():
                out = _SlowBackward.apply(out, ms)
            return out

        module.forward = slow_forward


class RandomTokens(IterableDataset):
    """Each rank's own batches of random tokens, fetched through a DataLoader as a real job's are; with `slow`
    (--slow-phase data) the fetch busy-waits, as a slow loader or storage would."""

    def __init__(self, args, rank: int, progress: dict, slow: bool):
        self.args, self.rank, self.progress, self.slow = args, rank, progress, slow

    def __iter__(self):
        args = self.args
        generator = torch.Generator().manual_seed(args.seed + 1000 + self.rank)
        while True:
            if self.slow:
                busy_wait(slow_ms_now(args, self.progress))
            yield torch.randint(args.vocab, (args.batch, args.context + 1), generator=generator)


def wrap_model(model: nn.Module, args, distributed: bool, cuda: bool) -> nn.Module:
    """DDP, FSDP2 (fully_shard per block, then the root) or FSDP1 (FullyShardedDataParallel per block)."""
    if not distributed or args.wrap == "none":
        return model
    if args.wrap == "ddp":
        return DistributedDataParallel(model)
    if args.wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=device)


def clip_gradients(wrapped: nn.Module, max_norm: float) -> None:
    """Clip the gradients' total norm, as HF Trainer (max_grad_norm=1.0), Lightning and torchtitan do by default.
    Under FSDP the norm of sharded gradients takes an all-reduce: every rank waits there for the last one."""
    if hasattr(wrapped, "clip_grad_norm_"):  # FSDP1 (sharded flat parameters)
        wrapped.clip_grad_norm_(max_norm)
    else:  # DDP and the plain model: local; FSDP2: DTensor gradients, the norm all-reduced
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm)


class StepTimes:
    """Each rank's own record of each step's wall time, appended as JSON lines: the ground truth of cost.

    Every rank's, not rank 0's alone: on shared cores a rank's step boundary moves by tens of ms against its
    peers' (rank 0's step before a peer's slow step can run long and the slow one short), while the ranks'
    sums over a few steps agree; the median over ranks of a step is the job's step. One short line per
    write, the file opened for appending: the ranks' lines do not mix."""

    def __init__(self, path: str | None, rank: int, attempt: int):
        self.file = open(path, "a") if path else None
        self.rank = rank
        self.attempt = attempt
        self.last = time.perf_counter()

    def step(self, step: int) -> None:
        now = time.perf_counter()
        if self.file is not None:
            row = {"attempt": self.attempt, "step": step, "rank": self.rank, "ms": (now - self.last) * 1e3}
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        self.last = now


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--slow-rank", type=int, default=None)
    p.add_argument("--slow-module", default="blocks.1.mlp", help="e.g. blocks.1.mlp (TinyGPT. prefix optional)")
    p.add_argument(
        "--slow-phase",
        choices=("forward", "backward", "whole", "data", "host", "post", "optimizer", "after", "gc"),
        default="forward",
        help="where the busy wait goes: modules' forward or backward, every leaf module (whole), "
        "batch loading (data: inside the DataLoader's fetch), the loop's code between forward and backward (host), "
        "between backward and the optimizer step (post) or after the optimizer step (after: an EMA update, "
        "logging), the optimizer step; "
        "gc: a full garbage collection of about --slow-ms in --slow-module's forward",
    )
    p.add_argument("--slow-ms", type=float, default=30.0, help="per slow module and step (whole: in all)")
    p.add_argument("--slow-from-step", type=int, default=0)
    p.add_argument("--slow-to-step", type=int, default=None)
    p.add_argument("--slow-every", type=int, default=1, help="intermittent: one slow step in N")
    p.add_argument("--slow-ramp-steps", type=int, default=0, help="ramp from 0 to --slow-ms over N steps")
    p.add_argument("--slow-attempt", type=int, default=None, help="only in this attempt (TORCHELASTIC_RESTART_COUNT)")
    p.add_argument("--fail-at-step", type=int, default=None, help="rank 0 fails at this step of the first attempt")
    p.add_argument("--wrap", choices=("ddp", "fsdp2", "fsdp1", "none"), default="ddp")
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="every N steps, every rank evaluates --eval-batches held-out batches (forwards without gradients, the "
        "loss summed over the ranks), as a trainer's eval_steps do; not in --step-times: that is the training pace",
    )
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--slow-blocking", action="store_true", help="host, post, after: a blocking wait, not compute")
    p.add_argument("--clip-grad-norm", type=float, default=0.0, help="clip gradients to this total norm (0: off)")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="each block's activations recomputed in backward (non-reentrant torch.utils.checkpoint, as "
        "transformers' gradient_checkpointing): a slow module's forward runs twice a step",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="every N steps rank 0 saves the model's state (torch.save), and the save takes --checkpoint-ms in all "
        "(a slow shared file system); its peers wait for it in the next step's collectives. Not in --step-times",
    )
    p.add_argument("--checkpoint-ms", type=float, default=500.0)
    p.add_argument(
        "--optimizers",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: one optimizer for the 2-D weights (SGD with momentum) and AdamW for the rest, stepped one after "
        "the other in every step (as Muon and AdamW are)",
    )
    p.add_argument("--step-times", default=None, help="every rank appends each step's wall time here (JSON lines)")
    return p.parse_args(argv)


def gradient_sync(model: nn.Module, args, last: bool):
    """--accumulate: gradients are reduced across the ranks in a step's last micro-batch only (DDP's and FSDP1's
    no_sync(), FSDP2's set_requires_gradient_sync)."""
    if last or args.wrap == "none" or "WORLD_SIZE" not in os.environ:
        if args.wrap == "fsdp2" and "WORLD_SIZE" in os.environ:
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if args.wrap == "fsdp2":
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()


def make_optimizers(model: nn.Module, count: int) -> list[torch.optim.Optimizer]:
    """One AdamW, or (count 2) SGD with momentum for the 2-D weights and AdamW for the rest."""
    params = list(model.parameters())
    if count == 1:
        return [torch.optim.AdamW(params, lr=3e-4)]
    matrices = [p for p in params if p.dim() == 2] or params[: len(params) // 2]  # FSDP1: flat 1-D parameters
    chosen = {id(p) for p in matrices}
    return [
        torch.optim.SGD(matrices, lr=1e-2, momentum=0.9),
        torch.optim.AdamW([p for p in params if id(p) not in chosen], lr=3e-4),
    ]


def evaluate(model: nn.Module, args, device, distributed: bool) -> float:
    """--eval-every: the mean loss over held-out batches, summed over the ranks (as an evaluation loop gathers it)."""
    batches = torch.Generator().manual_seed(args.seed + 2000)
    total = torch.zeros((), device=device)
    model.eval()
    with torch.no_grad():
        for _ in range(args.eval_batches):
            tokens = torch.randint(args.vocab, (args.batch, args.context + 1), generator=batches).to(device)
            logits = model(tokens[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1)) / args.eval_batches
    model.train()
    if distributed:
        dist.all_reduce(total)
    return float(total)


def save_checkpoint(model: nn.Module, total_ms: float) -> None:
    """--checkpoint-every: torch.save of rank 0's parameters (its own shards under FSDP: no collective) to a scratch
    file, then a wait until the save has taken total_ms (a slow shared file system)."""
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryFile() as f:
        torch.save([getattr(p, "_local_tensor", p).detach() for p in model.parameters()], f)
    time.sleep(max(0.0, total_ms / 1e3 - (time.perf_counter() - start)))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    distributed = "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", 0))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if distributed and attempt:
        # A restarted attempt reuses torchrun's store, which still holds the first attempt's gloo
        # addresses under the same keys: join it under a prefix of its own.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=60)
        )
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            store=dist.PrefixStore(f"attempt-{attempt}", store),
            rank=rank,
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    elif distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = TinyGPT(args.vocab, args.dim, args.heads, args.layers, args.context).to(device)
    model.activation_checkpointing = args.activation_checkpointing
    progress = {"step": 0, "attempt": attempt}
    slow_here = args.slow_rank == rank
    if slow_here and args.slow_phase in ("forward", "backward", "whole", "gc"):
        inject_slowness(model, args, progress)
    wrapped = wrap_model(model, args, distributed, cuda)
    optimizers = make_optimizers(wrapped, args.optimizers)
    if slow_here and args.slow_phase == "optimizer":
        optimizers[-1].register_step_pre_hook(lambda *_: busy_wait(slow_ms_now(args, progress)))
    batches = iter(DataLoader(RandomTokens(args, rank, progress, slow_here and args.slow_phase == "data"), None))
    times = StepTimes(args.step_times, rank, attempt)

    for step in range(args.steps):
        progress["step"] = step
        if args.fail_at_step == step and attempt == 0 and rank == 0:
            raise SystemExit(f"failing on purpose at step {step} of attempt 0 (--fail-at-step)")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        for micro in range(args.accumulate):  # the faults below: in each micro-batch
            tokens = next(batches).to(device)
            with gradient_sync(wrapped, args, micro == args.accumulate - 1):
                logits = wrapped(tokens[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1)) / args.accumulate
                if slow_here and args.slow_phase == "host":
                    loop_code(args, slow_ms_now(args, progress))  # a user's metrics, logging: between forward, backward
                loss.backward()
        if slow_here and args.slow_phase == "post":
            loop_code(args, slow_ms_now(args, progress))  # a user's gradient clipping, loss.item(), logging
        if args.clip_grad_norm:
            clip_gradients(wrapped, args.clip_grad_norm)
        for opt in optimizers:
            opt.step()
        if slow_here and args.slow_phase == "after":
            loop_code(args, slow_ms_now(args, progress))  # a user's EMA update, metrics, logging after the step
        times.step(step)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            eval_loss = evaluate(wrapped, args, device, distributed)
            times.last = time.perf_counter()  # the job's own step times are its training pace: evaluation is not
            if rank == 0:
                print(f"step {step} eval loss {eval_loss:.4f}", flush=True)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and rank == 0:
            save_checkpoint(model, args.checkpoint_ms)
            times.last = time.perf_counter()  # the training pace, as for evaluation
        if slow_here and args.slow_phase == "gc" and step == 0:  # after the first step's lazy imports (frozen)
            progress["heap"] = gc_heap(args.slow_ms)  # alive for the whole run
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    if distributed:
        # Tear down explicitly, in an order that cannot deadlock: gloo's worker threads free finished
        # all-reduce work objects, and one created during backward holds a Python object in its
        # captured thread-local state, so freeing it needs the GIL. If the process group were
        # destroyed implicitly (the DDP reducer dying as main() returns), the main thread would join
        # those workers while holding the GIL. So: let every rank finish, give the workers the GIL
        # for a moment, drop the reducer while the group is still registered, then destroy the group.
        # (Under the agent destroy_process_group() waits for those workers itself, agent/teardown.py;
        # this order keeps the script safe without it too.)
        dist.barrier()
        time.sleep(0.05)
        del wrapped, opt, optimizers
        gc.collect()
        dist.destroy_process_group()
    if rank == 0:
        print("done", flush=True)


if __name__ == "__main__":
    main()
