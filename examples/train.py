"""A small GPT-style language model trained with DDP on synthetic tokens, with a straggler on demand.

    torchrun --nproc-per-node 4 examples/train.py --steps 40
    torchrun --nproc-per-node 4 -m modtrack.agent --collector 127.0.0.1:50051 examples/train.py \
        --slow-rank 2 --slow-module blocks.1.mlp --slow-phase backward --slow-ms 40 --slow-from-step 15

The fault injection busy-waits (slow compute, not sleep) inside one module's forward, or
inside its backward through an autograd Function placed at that module's output, on one rank.
It prints the same lines with or without the agent: loss is deterministic for a given seed.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


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

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


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


def inject_slowness(model: nn.Module, args, progress: dict) -> None:
    """Wrap one module's forward so that it is slow, in forward or backward, while the step is in range."""
    name = args.slow_module.removeprefix(type(model).__name__ + ".")
    module = model.get_submodule(name)
    original = module.forward

    def active() -> bool:
        step = progress["step"]
        return step >= args.slow_from_step and (args.slow_to_step is None or step < args.slow_to_step)

    def slow_forward(*a, **kw):
        if args.slow_phase == "forward" and active():
            busy_wait(args.slow_ms)
        out = original(*a, **kw)
        if args.slow_phase == "backward" and active() and torch.is_grad_enabled():
            out = _SlowBackward.apply(out, args.slow_ms)
        return out

    module.forward = slow_forward


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
    p.add_argument("--slow-phase", choices=("forward", "backward"), default="forward")
    p.add_argument("--slow-ms", type=float, default=30.0)
    p.add_argument("--slow-from-step", type=int, default=0)
    p.add_argument("--slow-to-step", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    distributed = "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", 0))
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = TinyGPT(args.vocab, args.dim, args.heads, args.layers, args.context).to(device)
    progress = {"step": 0}
    if args.slow_rank == rank:
        inject_slowness(model, args, progress)
    wrapped = DistributedDataParallel(model) if distributed else model
    opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-4)
    data = torch.Generator().manual_seed(args.seed + 1000 + rank)  # each rank its own batches

    for step in range(args.steps):
        progress["step"] = step
        tokens = torch.randint(args.vocab, (args.batch, args.context + 1), generator=data).to(device)
        logits = wrapped(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    if distributed:
        # Tear down explicitly, in an order that cannot deadlock: gloo's worker threads free finished
        # all-reduce work objects, and one created during backward holds a Python object in its
        # captured thread-local state, so freeing it needs the GIL. If the process group were
        # destroyed implicitly (the DDP reducer dying as main() returns), the main thread would join
        # those workers while holding the GIL. So: let every rank finish, give the workers the GIL
        # for a moment, drop the reducer while the group is still registered, then destroy the group.
        dist.barrier()
        time.sleep(0.05)
        del wrapped, opt
        gc.collect()
        dist.destroy_process_group()
    if rank == 0:
        print("done", flush=True)


if __name__ == "__main__":
    main()
