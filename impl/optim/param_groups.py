"""Parameter groups for layer-wise adaptive optimizers (LARS, LAMB).

You et al. (2017, 2019) and the large-batch recipes that followed (e.g. the
MLPerf BERT/ResNet LAMB/LARS setups) exclude biases and normalisation gains
from both weight decay and the trust ratio: their norm ‖w‖ carries no
information about the layer's scale (a LayerNorm gain starts at ‖1‖ = sqrt(d)
whatever the layer does), so scaling their step by it is noise. In a decoder
every 1-D parameter is such a bias or gain, so the rule is simply `p.dim() == 1`.

Each group carries a ``trust_ratio`` flag that ``Lamb`` and ``Lars`` honour.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def trust_ratio_groups(model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
                       weight_decay: float) -> list[dict]:
    """Two param groups: matrices (≥ 2-D) with ``weight_decay`` and
    ``trust_ratio=True``; 1-D params (biases, norm gains) with weight decay 0
    and ``trust_ratio=False``. Frozen params are left out; an empty group is
    dropped. Each group also lists its parameter ``names``, for reporting."""
    if isinstance(model_or_named_params, nn.Module):
        named = model_or_named_params.named_parameters()
    else:
        named = model_or_named_params
    matrices: dict = {"params": [], "names": [], "weight_decay": weight_decay, "trust_ratio": True}
    vectors: dict = {"params": [], "names": [], "weight_decay": 0.0, "trust_ratio": False}
    for name, p in named:
        if not p.requires_grad:
            continue
        group = matrices if p.dim() > 1 else vectors
        group["params"].append(p)
        group["names"].append(name)
    return [g for g in (matrices, vectors) if g["params"]]
