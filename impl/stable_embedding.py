"""Stable embedding layer for 8-bit optimizers (Dettmers et al. 2021, Sec. 3),
the in-house twin of ``bitsandbytes.nn.StableEmbedding``:

    h = LayerNorm(E[tokens])        E initialised Xavier-uniform,
                                    U(-a, a), a = sqrt(6 / (vocab + dim))

and the weight E keeps 32-bit optimizer state under ``impl.optim.adam8bit.Adam8bit``
(the parameter carries ``FP32_STATE_ATTR``), because an embedding's
per-row gradients are sparse and span a huge range, the worst case for
block-wise quantized moments.  The LayerNorm runs in fp32 and the output is
cast back to the weight's dtype, as bitsandbytes does.

Note this changes the model's math (init and an extra norm); the report must
say so when a cell uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from impl.optim.adam8bit import FP32_STATE_ATTR


class StableEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.norm = nn.LayerNorm(embedding_dim, device=self.weight.device)
        setattr(self.weight, FP32_STATE_ATTR, True)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, T, dim)."""
        emb = F.embedding(tokens, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        return self.norm(emb.float()).to(self.weight.dtype)


def apply_stable_embedding(model: nn.Module, attr: str = "tok_embeddings") -> nn.Module:
    """Replace ``model.<attr>`` (an nn.Embedding) by a freshly initialised StableEmbedding."""
    old = getattr(model, attr)
    new = StableEmbedding(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx,
                          device=old.weight.device, dtype=old.weight.dtype)
    setattr(model, attr, new)
    return model
