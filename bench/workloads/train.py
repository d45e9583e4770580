"""The one workload every cell trains: model, synthetic data, loss, optimizer settings.

Batches are deterministic functions of (seed, step): every adapter, every
world size and the single-process reference see the same global batch, and a
data-parallel rank takes its contiguous slice of rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.theory.convergence import STRIDES
from impl.model_config import ModelConfig

LR = 1e-3
"""Every optimizer's default learning rate; a cell's ``lr`` knob replaces it
(``set_learning_rate``, called by the worker before anything is built)."""
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
SGD_MOMENTUM = 0.9


@dataclass(frozen=True, slots=True)
class Batch:
    inputs: torch.Tensor  # (b, T) token ids
    targets: torch.Tensor  # (b, T) next-token ids

    def split(self, n: int) -> list["Batch"]:
        """n micro-batches along the batch dimension."""
        return [Batch(i, t) for i, t in zip(self.inputs.chunk(n), self.targets.chunk(n))]


def global_batch(cfg: ModelConfig, *, batch_size: int, seq_len: int, seed: int, step: int) -> Batch:
    """A learnable synthetic language: each row is an arithmetic progression
    mod V with a random start and one of ``STRIDES`` strides, so the loss falls
    as the model learns the strides (random tokens would give a flat log V).
    Its loss floor is ``bench.theory.convergence.loss_floor``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, cfg.vocab_size, (batch_size, 1), generator=g)
    stride = torch.randint(1, STRIDES + 1, (batch_size, 1), generator=g)
    tokens = (start + stride * torch.arange(seq_len + 1)) % cfg.vocab_size
    return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def local_batch(batch: Batch, *, dp_rank: int, dp: int) -> Batch:
    rows = batch.inputs.shape[0] // dp
    sl = slice(dp_rank * rows, (dp_rank + 1) * rows)
    return Batch(batch.inputs[sl], batch.targets[sl])


_learning_rate = LR


def set_learning_rate(lr: float | None) -> None:
    """This process's learning rate for every optimizer (None: ``LR``). A rank
    runs one cell, so the cell's ``lr`` knob is set once, before the build."""
    global _learning_rate
    _learning_rate = LR if lr is None else lr


def learning_rate() -> float:
    return _learning_rate


def optimizer_spec(name: str) -> tuple[type[torch.optim.Optimizer], dict]:
    """The torch optimizer class and the workload's hyper-parameters for it."""
    if name == "adamw":
        return torch.optim.AdamW, {"lr": learning_rate(), "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}
    if name == "sgd":
        return torch.optim.SGD, {"lr": learning_rate(), "momentum": SGD_MOMENTUM}
    if name == "adafactor":
        return torch.optim.Adafactor, {"lr": learning_rate(), "weight_decay": WEIGHT_DECAY}
    if name == "adam8bit":  # what PyTorch users reach for: bitsandbytes (block 256 in 0.50, CPU kernels)
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit, {"lr": learning_rate(), "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}
    raise ValueError(f"optimizer {name!r} is not a torch optimizer")


def torch_optimizer(name: str, params) -> torch.optim.Optimizer:
    cls, kwargs = optimizer_spec(name)
    return cls(list(params), **kwargs)
