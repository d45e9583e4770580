"""1D tensor parallelism (Megatron-LM; Shoeybi et al. 2019) and Megatron
sequence parallelism (Korthikanti et al. 2022), applied to ``impl.model.Decoder``
from outside.

Layout over a tensor-parallel group of t ranks (rank i), nn.Linear weights
being (out, in):

* ``wq``/``wk``/``wv``, ``w1``/``w3``: :class:`ColumnParallelLinear`, weight
  rows [i·out/t, (i+1)·out/t) — n_heads/t query heads and n_kv_heads/t
  key/value heads per rank (``Attention.forward`` reads the local head count
  from the weight), ffn_dim/t SwiGLU units;
* ``wo``/``w2``: :class:`RowParallelLinear`, weight columns [i·in/t, (i+1)·in/t);
  the partial outputs are summed by ``g`` (all-reduce);
* ``tok_embeddings``: :class:`VocabParallelEmbedding`, rows [i·V/t, (i+1)·V/t);
* ``output``: :class:`ColumnParallelLinear` over the vocabulary; its (B, T, V/t)
  logits go to ``vocab_parallel_cross_entropy`` (``TensorParallel.loss``) and
  are never gathered.

Each attention and feed-forward sub-layer is one tensor-parallel region
(Shoeybi et al. Fig. 3): a forward pre-hook applies ``f`` once to its input
(shared by wq/wk/wv, or w1/w3, so backward all-reduces one summed input
gradient, not one per projection) and the row-parallel output applies ``g``:
2 all-reduces of (B, T, D) per region and step, forward plus backward.

Sequence parallel: the residual stream and the RMSNorms hold (B, T/t, D);
``f``/``g`` become all-gather / reduce-scatter along T (``g̅``/``ḡ``), the
embedding reduce-scatters and the head all-gathers. RoPE sees every position
because the gather happens at the attention input. A norm weight's gradient
then covers only T/t positions: ``sync_sequence_parallel_grads`` sums them
over the group (Korthikanti et al. §4.2.2).

Weights are sliced from the full (same-seed) model in place, so the sharded
model computes the unsharded model's function.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from impl.model import Decoder
from impl.parallel_dims import ParallelDims
from impl.tp_comm import (
    copy_to_tp,
    gather_from_sequence,
    reduce_from_tp,
    reduce_scatter_to_sequence,
    vocab_parallel_cross_entropy,
)

Enter = Literal["none", "copy", "gather"]
Exit = Literal["reduce", "reduce_scatter"]


def _enter(x: torch.Tensor, how: Enter, group) -> torch.Tensor:
    if how == "copy":
        return copy_to_tp(x, group)
    if how == "gather":
        return gather_from_sequence(x, group)
    return x


def _exit(x: torch.Tensor, how: Exit, group) -> torch.Tensor:
    return reduce_scatter_to_sequence(x, group) if how == "reduce_scatter" else reduce_from_tp(x, group)


def _shard(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if t.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not divisible by the tensor-parallel degree {n}")
    return t.detach().chunk(n, dim=dim)[r].clone()


class ColumnParallelLinear(nn.Module):
    """Y = X Aᵀ with A (out, in) split on dim 0: this rank holds A_i (out/t, in)
    and returns Y_i = X A_iᵀ, its out/t output features; no forward communication.

    ``enter`` is the operator X passes first: ``copy`` (f: all-reduce of ∂X in
    backward), ``gather`` (g̅: X is a (B, T/t, D) sequence shard) or ``none``
    when the enclosing region already applied it."""

    def __init__(self, weight: torch.Tensor, *, group, enter: Enter = "copy") -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.group, self.enter = group, enter

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group, enter: Enter = "copy") -> "ColumnParallelLinear":
        if linear.bias is not None:
            raise ValueError("biased linears are not sharded (the decoder has none)")
        return cls(_shard(linear.weight, 0, group), group=group, enter=enter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_enter(x, self.enter, self.group), self.weight)


class RowParallelLinear(nn.Module):
    """Y = X Aᵀ with A (out, in) split on dim 1: this rank holds A_i (out, in/t),
    takes X_i, the matching in/t features (a column-parallel output), and
    Y = Σ_i X_i A_iᵀ is summed by ``exit``: ``reduce`` (g: all-reduce) or
    ``reduce_scatter`` (ḡ: each rank keeps its (B, T/t, out) sequence shard)."""

    def __init__(self, weight: torch.Tensor, *, group, exit: Exit = "reduce") -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.group, self.exit = group, exit

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group, exit: Exit = "reduce") -> "RowParallelLinear":
        if linear.bias is not None:
            raise ValueError("biased linears are not sharded (the decoder has none)")
        return cls(_shard(linear.weight, 1, group), group=group, exit=exit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _exit(F.linear(x, self.weight), self.exit, self.group)


class VocabParallelEmbedding(nn.Module):
    """Table E (V, D) split on dim 0: this rank holds rows [start, start + V/t).
    Ids outside the range look up row 0 and are zeroed; ``exit`` sums the
    ranks' (B, T, D) partial lookups (exactly one rank contributes per id)."""

    def __init__(self, weight: torch.Tensor, *, start: int, group, exit: Exit = "reduce") -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.start, self.group, self.exit = start, group, exit

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, *, group, exit: Exit = "reduce") -> "VocabParallelEmbedding":
        shard = _shard(emb.weight, 0, group)
        return cls(shard, start=dist.get_rank(group) * shard.shape[0], group=group, exit=exit)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.weight.shape[0])
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, D) partial
        return _exit(out, self.exit, self.group)


@dataclass(kw_only=True, slots=True)
class TensorParallel:
    """What ``apply_tensor_parallel`` did, and the two calls a training step needs."""

    group: object
    """The tensor-parallel process group."""
    sequence_parallel: bool
    """Megatron sequence parallelism on (norm regions on (B, T/t, D) shards)."""
    vocab_start: int
    """First vocabulary id of this rank's embedding rows and logits."""
    shard_dims: dict[str, int | None] = field(default_factory=dict)
    """Parameter name → the dim it is split on over the group (None: replicated)."""
    sequence_parallel_params: list[nn.Parameter] = field(default_factory=list)
    """Replicated parameters whose gradients are partial sums under SP (the norm weights)."""

    def loss(self, local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy from (B, T, V/t) logits; the same on every rank."""
        return vocab_parallel_cross_entropy(local_logits, targets, vocab_start=self.vocab_start, group=self.group)

    def sync_sequence_parallel_grads(self) -> None:
        """Sum the norm weights' gradients over the group (one flat all-reduce);
        call after the last backward and before the optimizer step."""
        grads = [p.grad for p in self.sequence_parallel_params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _pre_hook(how: Enter, group):
    def hook(module, args):
        return (_enter(args[0], how, group), *args[1:])

    return hook


def apply_tensor_parallel(model: Decoder, *, group, sequence_parallel: bool = False) -> TensorParallel:
    """Shard ``model`` in place over ``group`` (every rank holds the same full weights)."""
    cfg, t = model.cfg, dist.get_world_size(group)
    for what, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("ffn_dim", cfg.ffn_dim),
                    ("vocab_size", cfg.vocab_size)):
        if n % t:
            raise ValueError(f"tensor-parallel degree {t} does not divide {what} = {n}")
    enter: Enter = "gather" if sequence_parallel else "copy"
    leave: Exit = "reduce_scatter" if sequence_parallel else "reduce"
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        for name in ("wq", "wk", "wv"):
            setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), group=group, enter="none"))
        attn.wo = RowParallelLinear.from_linear(attn.wo, group=group, exit=leave)
        for name in ("w1", "w3"):
            setattr(ffn, name, ColumnParallelLinear.from_linear(getattr(ffn, name), group=group, enter="none"))
        ffn.w2 = RowParallelLinear.from_linear(ffn.w2, group=group, exit=leave)
        # One f (or g̅) per region, on the sub-layer input; the hook keeps the
        # model's code and parameter names unchanged.
        attn.register_forward_pre_hook(_pre_hook(enter, group))
        ffn.register_forward_pre_hook(_pre_hook(enter, group))
    model.tok_embeddings = VocabParallelEmbedding.from_embedding(model.tok_embeddings, group=group, exit=leave)
    model.output = ColumnParallelLinear.from_linear(model.output, group=group, enter=enter)

    shard_dims: dict[str, int | None] = {}
    sp_params = []
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            shard_dims[name] = 0
        elif isinstance(module, RowParallelLinear):
            shard_dims[name] = 1
        else:
            shard_dims[name] = None
            sp_params.append(p)
    return TensorParallel(group=group, sequence_parallel=sequence_parallel, vocab_start=model.tok_embeddings.start,
                          shard_dims=shard_dims, sequence_parallel_params=sp_params if sequence_parallel else [])


@dataclass(frozen=True, slots=True)
class TpDpGroups:
    tp: object
    """This rank's tensor-parallel group (neighbouring ranks; ``ParallelDims.coords``)."""
    dp: object
    """This rank's data-parallel group (same tp and pp coordinates)."""


def new_tp_dp_groups(dims: ParallelDims) -> TpDpGroups:
    """Build every tp and dp group of the grid; collective: all ranks call it,
    in the same order, as ``dist.new_group`` requires."""
    rank = dist.get_rank()
    coords = [dims.coords(r) for r in range(dims.world_size)]
    mine = coords[rank]
    tp_group = dp_group = None
    for key in sorted({(c[0], c[1]) for c in coords}):
        g = dist.new_group([r for r, c in enumerate(coords) if (c[0], c[1]) == key])
        if (mine[0], mine[1]) == key:
            tp_group = g
    for key in sorted({(c[1], c[2]) for c in coords}):
        g = dist.new_group([r for r, c in enumerate(coords) if (c[1], c[2]) == key])
        if (mine[1], mine[2]) == key:
            dp_group = g
    return TpDpGroups(tp=tp_group, dp=dp_group)
