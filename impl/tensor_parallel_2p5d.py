"""2.5D tensor parallelism (Tesseract; Wang et al., arXiv 2105.14500,
Colossal-AI's ``Linear2p5D``): d depth layers, each a q × q SUMMA grid
(``impl.tensor_parallel_2d``), tp = q²·d.

Layout, rank (k, i, j), tp rank = k·q² + i·q + j:

* activations: the b sequences are split into d·q blocks; layer k's grid
  takes sequences [k·b/d, (k+1)·b/d) and inside it rank (i, j) holds rows
  block i, features block j, exactly as in 2D — (b/(d·q), s, h/q);
* weights: the 2D blocks W[j, i] (out/q, in/q), the embedding's (V/q, h/q) and
  the norms' h/q, replicated over the d layers (the depth group of a rank is
  the d ranks with its (i, j));
* each layer's SUMMA gives the gradients of its layer's mean loss; the step's
  loss is the mean over the layers (:func:`mean_over`, gradient ÷ d), and
  :meth:`TensorParallel2p5D.sync_grads` sums every gradient over the depth group.

Communication per rank and step: the 2D volumes with n = b·s/d tokens per
layer, plus m all-reduces of the one-value loss over the depth group and the
gradient all-reduce over it, 2Ψ_rank(d−1)/d (``bench.theory.tp2d_comm_bytes``).
Per rank: Ψ/q² for every linear and the embedding (the same as 2D on q²
ranks: depth buys batch, not memory), norms h/q; activations (b/(dq))·s·h/q.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from impl.model import Decoder
from impl.parallel_dims import ParallelDims
from impl.tensor_parallel_2d import (
    Grid,
    TensorParallel2D,
    all_reduce_grads,
    apply_tensor_parallel_2d,
    mean_over,
    new_grid,
)


def new_grid_2p5d(dims: ParallelDims, *, depth: int) -> Grid:
    """The row, column, depth (and dp) groups of a dp × (d × q × q) grid; collective."""
    if depth < 2:
        raise ValueError(f"2.5D needs tp_depth >= 2, got {depth} (depth 1 is 2D)")
    return new_grid(dims, depth=depth)


@dataclass(kw_only=True, slots=True)
class TensorParallel2p5D:
    """A 2D plan on each depth layer plus the depth-group reductions."""

    tp2d: TensorParallel2D
    params: list[nn.Parameter]
    """Every parameter: replicated over the depth group."""

    @property
    def grid(self) -> Grid:
        return self.tp2d.grid

    def local_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer k's b/d sequences, then the 2D split of them."""
        d, k = self.grid.depth, self.grid.k
        if inputs.shape[0] % d:
            raise ValueError(f"batch of {inputs.shape[0]} sequences is not divisible by tp_depth = {d}")
        return self.tp2d.local_batch(inputs.chunk(d)[k], targets.chunk(d)[k])

    def loss(self, local_logits: torch.Tensor, local_targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all d layers' tokens; the same on every rank."""
        return mean_over(self.tp2d.loss(local_logits, local_targets), self.grid.depth_group)

    def sync_grads(self) -> None:
        """Norm gradients over the column group, then every gradient over the depth group."""
        self.tp2d.sync_grads()
        all_reduce_grads(self.params, self.grid.depth_group)

    def full_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.tp2d.full_tensor(name, t)


def apply_tensor_parallel_2p5d(model: Decoder, grid: Grid) -> TensorParallel2p5D:
    """Shard ``model`` in place over one depth layer's q × q grid; the blocks are
    the same on every layer."""
    if grid.depth_group is None:
        raise ValueError("2.5D needs a grid with depth >= 2 (new_grid_2p5d)")
    tp2d = apply_tensor_parallel_2d(model, grid)
    return TensorParallel2p5D(tp2d=tp2d, params=list(model.parameters()))
