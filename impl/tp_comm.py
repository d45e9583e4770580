"""Communication of 1D tensor parallelism as autograd functions (Megatron-LM).

Shoeybi et al. 2019, §3 (Fig. 3): two conjugate operators bracket every
tensor-parallel region,

* ``f`` (:func:`copy_to_tp`): identity in forward, all-reduce in backward —
  placed where a replicated activation enters column-parallel linears, so
  the partial input gradients of the t shards are summed;
* ``g`` (:func:`reduce_from_tp`): all-reduce in forward, identity in
  backward — placed after a row-parallel linear, summing its partial outputs.

Sequence parallelism (Korthikanti et al. 2022, §4.2.2, Fig. 5) replaces them
with their sequence-sharded counterparts, moving the same bytes (an
all-reduce is a reduce-scatter followed by an all-gather):

* ``g̅`` (:func:`gather_from_sequence`): all-gather along the sequence in
  forward, reduce-scatter in backward — (B, T/t, D) → (B, T, D);
* ``ḡ`` (:func:`reduce_scatter_to_sequence`): reduce-scatter along the
  sequence in forward, all-gather in backward — (B, T, D) partial sums →
  (B, T/t, D) full sums.

:func:`vocab_parallel_cross_entropy` is Megatron's ``_VocabParallelCrossEntropy``:
the loss over logits split by vocabulary, from three all-reduces of one value
per token (max, target logit, sum of exponentials), never the (N, V) logits.

All collectives run on an explicit ``group`` (the tensor-parallel group).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_DIM = 1  # activations are (B, T, D)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def all_gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate the group's pieces along ``dim`` in group-rank order
    (all_gather_into_tensor concatenates along dim 0: ``dim`` is moved there and back)."""
    n = dist.get_world_size(group)
    local = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * local.shape[0], *local.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, local, group=group)
    return out.movedim(0, dim)


def reduce_scatter_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over the group, keep this rank's chunk along ``dim``."""
    n = dist.get_world_size(group)
    full = x.movedim(dim, 0).contiguous()
    out = torch.empty((full.shape[0] // n, *full.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, full, group=group)
    return out.movedim(0, dim)


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T/t, D) → (B, T, D), rank i's chunk at positions [i·T/t, (i+1)·T/t)."""
    return all_gather_along(x, SEQ_DIM, group)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T, D) partial sums → this rank's (B, T/t, D) chunk of the sum."""
    t = dist.get_world_size(group)
    if x.shape[SEQ_DIM] % t:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by the tensor-parallel degree {t}")
    return reduce_scatter_along(x, SEQ_DIM, group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's f: identity forward, all-reduce backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's g: all-reduce forward, identity backward."""
    return _ReduceFromTP.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """g̅ (sequence parallel): all-gather along T forward, reduce-scatter backward."""
    return _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """ḡ (sequence parallel): reduce-scatter along T forward, all-gather backward."""
    return _ReduceScatterToSequence.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's (B, T/t, D) chunk of a replicated (B, T, D) tensor (no communication;
    used by tests to build sequence-parallel inputs)."""
    t, r = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(t, dim=SEQ_DIM)[r].contiguous()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from logits (N, V/t) holding vocabulary [start, start + V/t).

    loss_n = log Σ_v exp(z_nv − m_n) − (z_n,y_n − m_n), with m_n = max_v z_nv;
    each sum over v is a local sum plus an all-reduce. Backward needs no
    communication: ∂loss_n/∂z_nv = softmax_nv − [v = y_n] on the local slice."""

    @staticmethod
    def forward(ctx, logits, targets, start, group):
        z = logits.float()
        m = z.max(dim=-1).values  # (N,)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m.unsqueeze(-1)
        outside = (targets < start) | (targets >= start + z.shape[-1])
        local = (targets - start).masked_fill(outside, 0)
        rows = torch.arange(z.shape[0], device=z.device)
        target_logit = z[rows, local].masked_fill(outside, 0.0)  # (N,), nonzero on one rank
        dist.all_reduce(target_logit, group=group)
        exp = z.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), outside, local)
        ctx.logits_dtype = logits.dtype
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, outside, local = ctx.saved_tensors
        rows = torch.arange(softmax.shape[0], device=softmax.device)
        g = softmax.clone()
        g[rows, local] -= (~outside).to(g.dtype)
        return (g * grad.unsqueeze(-1)).to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int,
                                 group) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V/t) split by vocabulary, targets (...) full ids."""
    per_token = _VocabParallelCrossEntropy.apply(logits.flatten(0, -2), targets.flatten(), vocab_start, group)
    return per_token.mean()
