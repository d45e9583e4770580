"""Pieces several adapters share: the standard step with gradient accumulation."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Protocol

import torch

from bench.workloads.train import Batch
from impl.model import lm_loss


class Steppable(Protocol):
    """A torch optimizer, or a wrapper that owns the update (ZeRO)."""

    def zero_grad(self) -> None: ...
    def step(self) -> None: ...


def accumulating_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: Steppable,
    *,
    microbatches: int,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss,
) -> Callable[[Batch], torch.Tensor]:
    """Forward/backward over `microbatches` slices (gradients synchronised only
    on the last), then one optimizer step. Returns the mean loss.
    ``scale_loss`` multiplies the loss before backward (dynamic loss scaling);
    ``loss`` maps (logits, targets) to the mean loss (e.g. vocab-parallel under TP)."""

    def step(batch: Batch) -> torch.Tensor:
        optimizer.zero_grad()
        parts = batch.split(microbatches)
        total = None  # on the loss's device: one host copy per step, not one sync per micro-batch
        for i, mb in enumerate(parts):
            ctx = no_sync() if i < len(parts) - 1 else nullcontext()
            with ctx:
                part = loss(forward(mb.inputs), mb.targets) / len(parts)
                (scale_loss(part) if scale_loss else part).backward()
            total = part.detach().float() if total is None else total + part.detach().float()
        optimizer.step()
        return total.cpu()

    return step
