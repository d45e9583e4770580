"""In-house optimizers, one file each; checked against references in tests/."""
from __future__ import annotations

import torch


def run_closure(closure) -> torch.Tensor | None:
    """torch.optim's closure protocol: re-evaluate the loss with grad enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
