"""Sequence parallelism with ring self-attention (Li et al. 2021, arXiv 2105.13120),
applied to ``impl.model.Decoder`` from outside.

The sequence is split end to end across the r ranks of a ring group: rank i
holds tokens [i·T/r, (i+1)·T/r) of every sequence — its embeddings, every
block's activations, its logits and its share of the loss — and the weights
are replicated. Everything but attention is per-token, so only the attention
core communicates: the key/value chunks travel around the ring
(Li et al. §3.1, Fig. 2 "Ring Self-Attention") and no rank ever holds the
full sequence, so activation memory per rank falls as 1/r.

Forward (r steps, rank i): at step j the rank holds K/V chunk c = (i − j) mod r,
computes blockwise attention of its queries against it and merges the partial
result with the log-sum-exp (online softmax, as flash attention does):

    lse' = log(e^lse + e^lse_j),  o' = o·e^(lse − lse') + o_j·e^(lse_j − lse'),

while it passes the chunk on to rank i+1 (the send overlaps the block's
compute): r − 1 K/V sends per rank and layer. Backward (as in
zhuzilin/ring-flash-attention) recomputes each block from the saved q, k, v,
output and LSE: dq accumulates locally; K/V travel the ring again and the
dK/dV contributions to chunk c travel with them in an accumulator that starts
at rank c+1 and ends at c — r − 1 K/V sends and r − 1 dK/dV sends.

Causal masking across chunks (contiguous layout): chunk c < i is fully
visible, c = i is the causal diagonal block, c > i is fully masked and
skipped. The ring still moves every chunk, so the traffic is uniform, but
rank i computes i + 1 of the r blocks: the last rank does r blocks, the
first one — a (r+1)/2r load imbalance that a zig-zag layout (rank i holding
chunks i and 2r−1−i) would remove; not done here.

RoPE: each rank's positions are its global ones. ``apply_ring_attention``
points the model's rope tables at [i·T/r, …) before every forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from impl.model import Decoder, causal_attention

KV_TAG, DKV_TAG = 0, 1


class _Ring:
    """This rank's place on the ring group and one batched send/recv per call."""

    def __init__(self, group) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, send: torch.Tensor, tag: int) -> "_Pending":
        """Post send → next and recv ← prev (same shape); wait on the result later."""
        recv = torch.empty_like(send)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, self.next, self.group, tag),
                                        dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)])
        return _Pending(send, recv, works)


@dataclass(slots=True)
class _Pending:
    send: torch.Tensor  # kept alive until the send completes
    recv: torch.Tensor
    works: list

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        return self.recv


def _causal_mask(n: int, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)  # True = masked (key after query)


def _scores(q, k, scale: float, diagonal: bool) -> torch.Tensor:
    s = (q @ k.transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
    return s.masked_fill(_causal_mask(s.shape[-1], s.device), float("-inf")) if diagonal else s


def _attend(q, k, v, scale: float, diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One block: output (B, nh, Tq, hs) and log-sum-exp (B, nh, Tq) of its scores."""
    s = _scores(q, k, scale, diagonal)
    lse = s.logsumexp(dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)) @ v, lse


def _merge(out, lse, blk_out, blk_lse) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two partial attentions over disjoint key sets."""
    new = torch.logaddexp(lse, blk_lse)
    return out * torch.exp(lse - new).unsqueeze(-1) + blk_out * torch.exp(blk_lse - new).unsqueeze(-1), new


def _attend_backward(q, k, v, dout, lse, delta, scale: float, diagonal: bool, dq: torch.Tensor):
    """Flash-attention backward of one block with the final LSE; adds to dq, returns (dk, dv)."""
    p = torch.exp(_scores(q, k, scale, diagonal) - lse.unsqueeze(-1))  # the final probabilities of this block
    dv = p.transpose(-2, -1) @ dout
    ds = p * (dout @ v.transpose(-2, -1) - delta.unsqueeze(-1))
    dq.add_(ds @ k, alpha=scale)
    return (ds.transpose(-2, -1) @ q) * scale, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group):
        ring = _Ring(group)
        scale = 1.0 / math.sqrt(q.shape[-1])
        qf = q.float()
        kv = torch.stack((k, v))  # (2, B, nh, T/r, hs): one message per step
        out = lse = None
        for j in range(ring.size):
            pending = ring.exchange(kv, KV_TAG) if j < ring.size - 1 else None
            if j <= ring.rank:  # chunk (rank − j) is not after this rank's queries
                blk = _attend(qf, kv[0].float(), kv[1].float(), scale, diagonal=j == 0)
                out, lse = blk if out is None else _merge(out, lse, *blk)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = _Ring(ctx.group), ctx.scale
        qf, dout = q.float(), dout.float()
        delta = (dout * out.float()).sum(-1)  # (B, nh, T/r): rowsum(dO ∘ O)
        dq = torch.zeros_like(qf)
        kv = torch.stack((k, v))
        own = acc = None
        for j in range(ring.size):
            pending = ring.exchange(kv, KV_TAG) if j < ring.size - 1 else None
            if j <= ring.rank:
                dkv = torch.stack(_attend_backward(qf, kv[0].float(), kv[1].float(), dout, lse, delta, scale,
                                                   diagonal=j == 0, dq=dq))
            else:
                dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            if j == 0:
                own = dkv  # this rank's chunk: the others' contributions arrive last
            else:
                # The accumulator for chunk (rank − j) started at its owner + 1.
                if acc is not None:
                    dkv = dkv + acc.wait()
                acc = ring.exchange(dkv, DKV_TAG)
            if pending is not None:
                kv = pending.wait()
        if acc is not None:
            own = own + acc.wait()
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group) -> torch.Tensor:
    """Causal attention of this rank's (B, nh, T/r, hs) chunk against the whole
    sequence, K/V passed around ``group`` (rank i holds chunk i)."""
    return _RingAttention.apply(q, k, v, group)


class RingAttentionCore:
    """``Attention.core`` replacement bound to a ring group."""

    def __init__(self, group) -> None:
        self.group = group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ring_attention(q, k, v, group=self.group)

    def __repr__(self) -> str:
        return f"RingAttentionCore(ranks={dist.get_world_size(self.group)})"


@dataclass(kw_only=True, slots=True)
class RingSequenceParallel:
    """What ``apply_ring_attention`` did."""

    group: object
    """The ring (sequence-parallel) process group."""
    rank: int
    """This rank's place on the ring: it holds sequence chunk ``rank``."""
    size: int
    """Ranks on the ring, r."""

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's (B, T/r, …) chunk of a (B, T, …) tensor (token ids or targets)."""
        if x.shape[1] % self.size:
            raise ValueError(f"sequence length {x.shape[1]} is not divisible by the ring size {self.size}")
        return x.chunk(self.size, dim=1)[self.rank].contiguous()


def apply_ring_attention(model: Decoder, *, group) -> RingSequenceParallel:
    """Make ``model`` run on this rank's sequence chunk: every attention core
    becomes the ring core and RoPE sees global positions. The model's inputs
    must then be (B, T/r) chunks (``RingSequenceParallel.shard``)."""
    plan = RingSequenceParallel(group=group, rank=dist.get_rank(group), size=dist.get_world_size(group))
    for block in model.layers:
        if block.attention.core is not causal_attention:
            raise ValueError("apply_ring_attention needs the dense causal core; attention.core was already replaced "
                             f"({block.attention.core!r})")
        block.attention.core = RingAttentionCore(group)
    cos, sin = model.rope_cos, model.rope_sin  # (max_seq_len, hs/2)

    def offset_rope(module: Decoder, args) -> None:
        # Decoder.forward takes rope_*[:T_local]: point the tables at this
        # chunk's first global position (views of the same storage).
        t = args[0].shape[1]
        start = plan.rank * t
        if start + t > cos.shape[0]:
            raise ValueError(f"global sequence length {plan.size * t} exceeds max_seq_len = {cos.shape[0]}")
        module.rope_cos, module.rope_sin = cos[start:], sin[start:]

    model.register_forward_pre_hook(offset_rope)
    return plan
