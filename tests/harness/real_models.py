"""The models the tracker tests run, models nobody on the project wrote: tiny transformers configs (random init,
nothing downloaded), nn.TransformerEncoder and a residual conv net; `build(name)` gives the same weights and batch
every time, optionally with activation checkpointing."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from harness.tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

VOCAB, BATCH, SEQ = 256, 4, 64


# ---- the models ---------------------------------------------------------------------------------
def llama():
    return tiny_llama(SEQ, VOCAB)


def gpt2():
    return tiny_gpt2(SEQ, VOCAB)


def bert():
    return tiny_bert(SEQ, VOCAB)


def t5():
    return tiny_t5(VOCAB)


class Encoder(nn.Module):
    """nn.TransformerEncoder with an embedding and a head; `checkpointed` checkpoints each layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, VOCAB)
        self.reentrant = None

    def forward(self, input_ids, labels):
        x = self.embed(input_ids)
        for layer in self.encoder.layers:
            x = layer(x) if self.reentrant is None else checkpoint(layer, x, use_reentrant=self.reentrant)
        logits = self.head(x)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


class ConvNet(nn.Module):
    """Residual conv blocks; ReLU(inplace=True) changes its input in place, as torchvision's do."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True)) for _ in range(2)
        )
        self.head = nn.Linear(16, 10)
        self.reentrant = None

    def forward(self, images, labels):
        x = self.stem(images)
        for block in self.blocks:  # residual blocks: each block's input is also the skip
            x = x + (block(x) if self.reentrant is None else checkpoint(block, x, use_reentrant=self.reentrant))
        logits = self.head(x.mean((2, 3)))
        return nn.functional.cross_entropy(logits, labels)


MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert, "t5": t5, "encoder": Encoder, "convnet": ConvNet}


def build(name: str, reentrant: bool | None = None):
    """(model, batch): the same weights and batch every time for one name."""
    torch.manual_seed(0)
    model = MODELS[name]()
    model.train()
    if reentrant is not None:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (the old name is deprecated there)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            model.reentrant = reentrant
    g = torch.Generator().manual_seed(0)
    if name == "convnet":
        return model, {
            "images": torch.randn(BATCH, 3, 16, 16, generator=g),
            "labels": torch.randint(0, 10, (BATCH,), generator=g),
        }
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ // 2), generator=g) if name == "t5" else ids
    return model, {"input_ids": ids, "labels": labels}


def loss_of(model, batch):
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.loss
