"""A tiny Llama trained by PyTorch Lightning or the HF Trainer, for torchrun (CPU, gloo).

`--slow-rank R --slow-ms M --slow-from-step S`: from step S on, rank R's user forward hook on
`model.layers.1.mlp` computes for M ms (thread CPU time): a straggler inside that module's own hook.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers

from harness.tiny_models import tiny_llama as build_tiny_llama

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)


def tiny_llama():
    torch.manual_seed(0)
    return build_tiny_llama(positions=32)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, items: int):
        self.items = torch.randint(0, 256, (items, 32), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def slow_hook(args):
    """A user's forward hook; on the slow rank, from the slow step on, it computes for slow-ms."""
    calls = 0
    slow = int(os.environ.get("RANK", "0")) == args.slow_rank

    def hook(module, inputs, output):
        nonlocal calls
        calls += 1
        if slow and calls > args.slow_from_step:
            end = time.thread_time() + args.slow_ms / 1e3
            while time.thread_time() < end:
                pass

    return hook


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", choices=["lightning", "hf"], required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--slow-ms", type=float, default=0.0)
    parser.add_argument("--slow-from-step", type=int, default=0)
    args = parser.parse_args()
    model = tiny_llama()
    model.get_submodule("model.layers.1.mlp").register_forward_hook(slow_hook(args))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = Tokens(4 * world * (args.steps + 1))
    if args.framework == "hf":
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hf-{os.getpid()}")
        targs = transformers.TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            ddp_backend="gloo",
            dataloader_num_workers=0,
            disable_tqdm=True,
            optim="adamw_torch",
        )
        transformers.Trainer(model=model, args=targs, train_dataset=data).train()
    else:
        import pytorch_lightning as pl

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = model

            def training_step(self, batch, batch_idx):
                return self.model(**batch).loss

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)

        trainer = pl.Trainer(
            max_steps=args.steps,
            accelerator="cpu",
            devices=world,
            strategy="ddp",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    print(f"done rank {os.environ.get('RANK', '0')}", flush=True)


if __name__ == "__main__":
    main()
