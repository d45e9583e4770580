"""3D tensor parallelism (Bian et al. 2021, arXiv 2105.14450; Colossal-AI's
``Linear3D``), applied to ``impl.model.Decoder`` from outside.

Cube. The tp = q³ ranks of a tensor-parallel group form a q×q×q cube, tp rank
i·q² + j·q + k ↔ (i, j, k). Groups (q ranks each): axis i (vary i, fixed j, k),
axis j, axis k; and the plane (i, j) at fixed k (q² ranks; norm gradients).

Layout. b sequences per data-parallel replica are cut into q² blocks of b/q²
whole sequences (attention needs every position of a sequence); features into
q blocks. An activation (b, T, F) lives in one of two layouts:

* A — residual stream, norms, inputs of wq/wk/wv/w1/w3 and the head: rank
  (i, j, k) holds sequence block i·q + j, feature block k: (b/q², T, F/q);
* B — outputs of those linears (q, k, v, SwiGLU, logits): sequence block
  i·q + k, feature block j, same shape.

3D matmul (Bian et al. Alg. 1–2, ``_Matmul3D``), Y = X Wᵀ with W (O, I) as in
nn.Linear, A → B: the weight block W[j, k] (O/q, I/q) is split along O over axis
i, so each rank stores (O/q², I/q) = 1/q³ of W. Forward: X_ik = all-gather_j(x)
(b/q, T, I/q); W_jk = all-gather_i(w); y = reduce-scatter_k(X_ik W_jkᵀ) —
the sum over the q input blocks, scattered by sequence: layout B. Backward is the
conjugate: dY = all-gather_k(dy), dx = reduce-scatter_j(dY W_jk),
dw = reduce-scatter_i(dYᵀ X_ik). B → A is the same with j and k swapped, so
consecutive linears alternate (wq → wo, w1 → w2) and the residual stays in A.
wq/wk/wv (and w1/w3) read one input: ``SharedGather`` gathers it once per
sub-layer (backward: one reduce-scatter of the summed gradient).

Around the linears:

* ``RMSNorm3D`` (layout A): Σx² over the local D/q features, all-reduced over
  axis k (backward: the conjugate all-reduce); its weight is the k-th D/q
  slice, replicated over the plane, whose q² ranks hold disjoint sequences:
  ``sync_norm_grads`` sums the gradients over the plane once per step.
* ``Embedding3D``: the table E (V, D) is blocked like an A → B weight (vocab
  block j, feature block k, split along V over axis i); it is the 3D matmul
  of one-hot ids (every rank has the ids, so no input gather) with E:
  all-gather_i(E), look up sequence block i (b/q) in vocab block j, then
  reduce-scatter_j → layout A.
* Head: an A → B ``Linear3D`` over the vocabulary: logits (b/q², T, V/q),
  vocab block j. The loss is Megatron's vocab-parallel cross-entropy over axis
  j (``impl.tp_comm``); full logits are never gathered. Each rank gets the
  mean over its b/q² sequences (equal on the q ranks of an axis-j group);
  the batch mean is the average of the q² blocks, so backward runs on
  ``loss · loss_scale`` (1/q²).

Communication per rank and step (bus bytes, nccl-tests factors; every all-gather
or reduce-scatter over q ranks moves (q−1)/q of its full-size side), with
N = b·T tokens, m micro-batches, c = 2(q−1)/q³ (one forward and one backward
collective of each kind) — ``bench.theory.tp3d_comm_bytes``:

  c·[ N·Σ_linears (O + I·[input gathered by the linear]) + N·D·(2L + 1)
      (the L·2 sub-layer input gathers and the embedding) + m·Ψ_matrices ]
  + (2L + 1)·4(q−1)·N/q³           norm Σx² all-reduces, forward + backward
  + 3·2(q−1)·N/q³ · 4 bytes         vocab-parallel loss (max, target, Σexp)
  + 2(q²−1)/q² · (2L + 1)·D/q       norm-weight gradients over the plane

Activation traffic falls as 1/q² per rank (Ψ-independent), weight traffic as
1/q² per micro-batch (Bian et al. §3.3: the 3D cost is O(1/q²) on both).

Memory per rank: every matrix (embedding, 7 per block, head) Ψ_matrices/q³
(and its gradient and Adam state); norm weights (2L + 1)·D/q, replicated on
the q² ranks of a plane; RoPE tables whole. Activations are 1/q³ of the
single-process model's in each layout; each linear additionally saves its
gathered input (b/q, T, I/q) and gathered weight block (O/q, I/q) for
backward, as Colossal-AI's ``Linear3D`` does (1/q² of the full sizes).

Weights are sliced from the full (same-seed) model in place, so the sharded
model computes the unsharded model's function.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from impl.model import Decoder, RMSNorm
from impl.parallel_dims import ParallelDims
from impl.tp_comm import (all_gather_along, copy_to_tp, reduce_from_tp, reduce_scatter_along,
                           vocab_parallel_cross_entropy)


# ---- collectives along dim 0 (sequences), the split dimension of every layout ----

def _gather0(x: torch.Tensor, group) -> torch.Tensor:
    """(n0, ...) per rank → (q·n0, ...), group rank r's block at [r·n0, (r+1)·n0)."""
    return all_gather_along(x, 0, group)


def _reduce_scatter0(x: torch.Tensor, group) -> torch.Tensor:
    """(q·n0, ...) partial sums → group rank r's (n0, ...) block of the sum."""
    return reduce_scatter_along(x, 0, group)


class _GatherInput(torch.autograd.Function):
    """all-gather forward, reduce-scatter backward (one shared input of several linears)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter0(grad, ctx.group), None


class _Matmul3D(torch.autograd.Function):
    """y = reduce-scatter_y(all-gather_x(x) · all-gather_w(w)ᵀ); x_group None: x is already gathered."""

    @staticmethod
    def forward(ctx, x, weight, x_group, w_group, y_group):
        xg = x if x_group is None else _gather0(x, x_group)  # (b/q, T, I/q)
        wg = _gather0(weight, w_group)  # (O/q, I/q)
        ctx.save_for_backward(xg, wg)
        ctx.groups = (x_group, w_group, y_group)
        return _reduce_scatter0(F.linear(xg, wg), y_group)  # (b/q², T, O/q)

    @staticmethod
    def backward(ctx, dy):
        xg, wg = ctx.saved_tensors
        x_group, w_group, y_group = ctx.groups
        d_out = _gather0(dy, y_group)  # (b/q, T, O/q)
        dx = d_out @ wg  # (b/q, T, I/q), partial over the output blocks
        if x_group is not None:
            dx = _reduce_scatter0(dx, x_group)
        dw = d_out.flatten(0, -2).t() @ xg.flatten(0, -2)  # (O/q, I/q), partial over sequence blocks
        return dx, _reduce_scatter0(dw, w_group), None, None, None


class _Embedding3D(torch.autograd.Function):
    """ids (b/q, T) → reduce-scatter_y(one-hot(ids) · all-gather_w(E)), E rows [start, start + V/q)."""

    @staticmethod
    def forward(ctx, ids, weight, start, w_group, y_group):
        table = _gather0(weight, w_group)  # (V/q, D/q)
        outside = (ids < start) | (ids >= start + table.shape[0])
        local = (ids - start).masked_fill(outside, 0)
        partial = F.embedding(local, table).masked_fill(outside.unsqueeze(-1), 0.0)  # (b/q, T, D/q)
        ctx.save_for_backward(local, outside)
        ctx.table_shape, ctx.groups = table.shape, (w_group, y_group)
        return _reduce_scatter0(partial, y_group)

    @staticmethod
    def backward(ctx, dy):
        local, outside = ctx.saved_tensors
        w_group, y_group = ctx.groups
        d_out = _gather0(dy, y_group)  # (b/q, T, D/q)
        inside = ~outside
        d_table = d_out.new_zeros(ctx.table_shape).index_add_(0, local[inside], d_out[inside])
        return None, _reduce_scatter0(d_table, w_group), None, None, None


# ---- the cube ----

@dataclass(frozen=True, slots=True)
class Cube:
    """This rank's place in its q×q×q tensor-parallel cube and the cube's groups."""

    q: int
    i: int
    j: int
    k: int
    axis_i: object
    """The q ranks (·, j, k): weights are gathered and their gradients reduce-scattered here."""
    axis_j: object
    """The q ranks (i, ·, k)."""
    axis_k: object
    """The q ranks (i, j, ·)."""
    plane: object
    """The q² ranks (·, ·, k): holders of the same norm-weight slice."""

    def block(self, x: torch.Tensor, a: int) -> torch.Tensor:
        """Sequence block i·q + a of q² along dim 0 (a = j: layout A, a = k: layout B)."""
        n = x.shape[0] // self.q**2
        start = (self.i * self.q + a) * n
        return x[start : start + n]


def cube_side(tp: int) -> int:
    q = round(tp ** (1 / 3))
    if q**3 != tp:
        raise ValueError(f"3D tensor parallelism needs tp = q³, got tp = {tp}")
    return q


def new_cube(dims: ParallelDims) -> Cube:
    """Build every axis and plane group of every cube of the grid; collective:
    all ranks call it, in the same order, as ``dist.new_group`` requires."""
    q = cube_side(dims.tp)
    rank = dist.get_rank()
    base = rank - dims.coords(rank)[2]  # first rank of this rank's tp block
    me = dims.coords(rank)[2]
    i, j, k = me // q**2, (me // q) % q, me % q
    idx = lambda a, b, c: a * q * q + b * q + c  # noqa: E731
    found: dict[str, object] = {}
    for first in range(0, dims.world_size, dims.tp):
        mine = first == base
        for a in range(q):
            for b in range(q):
                for name, members, holds in (
                    ("axis_i", [idx(c, a, b) for c in range(q)], (j, k) == (a, b)),
                    ("axis_j", [idx(a, c, b) for c in range(q)], (i, k) == (a, b)),
                    ("axis_k", [idx(a, b, c) for c in range(q)], (i, j) == (a, b)),
                ):
                    g = dist.new_group([first + m for m in members])
                    if mine and holds:
                        found[name] = g
        for c in range(q):
            g = dist.new_group([first + idx(a, b, c) for a in range(q) for b in range(q)])
            if mine and c == k:
                found["plane"] = g
    return Cube(q=q, i=i, j=j, k=k, **found)


# ---- layers ----

def _block_index(rows: int, cols: int | None, *, a: int, c: int, cube: Cube) -> tuple[slice, ...]:
    """Where this rank's shard sits in the full tensor: rows of block a (of q),
    piece i (of q) within it; columns block c (of q). A 1-D tensor: block c only."""
    q = cube.q
    if cols is None:
        n = rows // q
        return (slice(c * n, (c + 1) * n),)
    r, n = rows // q**2, cols // q
    start = a * (rows // q) + cube.i * r
    return slice(start, start + r), slice(c * n, (c + 1) * n)


class SharedGather:
    """One all-gather of a sub-layer input for all the projections that read it
    (wq/wk/wv or w1/w3): the first call gathers, later calls with the same tensor
    reuse it, so backward sums their input gradients and reduce-scatters once.
    ``clear`` (a forward hook on the sub-layer) drops the reference."""

    def __init__(self, group) -> None:
        self.group, self.last = group, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.last is None or self.last[0] is not x:
            self.last = (x, _GatherInput.apply(x, self.group))
        return self.last[1]

    def clear(self, *_) -> None:
        self.last = None


class Linear3D(nn.Module):
    """A 3D-parallel nn.Linear (no bias). ``layout_in`` "A": A → B (input gathered
    over axis j, output reduce-scattered over axis k, weight block [j, k]);
    "B": B → A (k and j swapped). ``shared``: the input gather of the sub-layer."""

    def __init__(self, weight: torch.Tensor, *, cube: Cube, layout_in: str, shared: SharedGather | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        x_axis, y_axis = (cube.axis_j, cube.axis_k) if layout_in == "A" else (cube.axis_k, cube.axis_j)
        self.groups = (None if shared else x_axis, cube.axis_i, y_axis)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Matmul3D.apply(self.shared(x) if self.shared else x, self.weight, *self.groups)


class Embedding3D(nn.Module):
    """Token ids of the whole local batch (b, T) → layout A (b/q², T, D/q)."""

    def __init__(self, weight: torch.Tensor, *, start: int, cube: Cube) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.start, self.cube = start, cube

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.cube
        if ids.shape[0] % c.q**2:
            raise ValueError(f"3D tensor parallelism splits the batch into q² = {c.q**2} blocks; "
                             f"got {ids.shape[0]} sequences")
        n = ids.shape[0] // c.q
        return _Embedding3D.apply(ids[c.i * n : (c.i + 1) * n], self.weight, self.start, c.axis_i, c.axis_j)


class RMSNorm3D(nn.Module):
    """``impl.model.RMSNorm`` over features split across axis k (layout A)."""

    def __init__(self, weight: torch.Tensor, *, eps: float, dim: int, cube: Cube) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.eps, self.dim, self.group = eps, dim, cube.axis_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # Σ over all D features: all-reduce forward and (f then g) all-reduce backward,
        # since every rank of axis k uses the sum.
        ss = reduce_from_tp(copy_to_tp(xf.pow(2).sum(-1, keepdim=True), self.group), self.group)
        xf = xf * torch.rsqrt(ss / self.dim + self.eps)
        return xf.type_as(x) * self.weight


@dataclass(kw_only=True, slots=True)
class TensorParallel3D:
    """What ``apply_tensor_parallel_3d`` did, and the calls a training step needs."""

    cube: Cube
    vocab_start: int
    """First vocabulary id of this rank's logits (vocab block j)."""
    shard_index: dict[str, tuple[slice, ...]] = field(default_factory=dict)
    """Parameter name → where this rank's shard sits in the full tensor."""
    norm_params: list[nn.Parameter] = field(default_factory=list)

    @property
    def loss_scale(self) -> float:
        """Backward on ``loss · loss_scale``: the batch mean is the average of the q² blocks' means."""
        return 1.0 / self.cube.q**2

    def loss(self, local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over this rank's b/q² sequences (layout B) from
        (b/q², T, V/q) logits; ``targets`` is the whole local batch (b, T)."""
        c = self.cube
        return vocab_parallel_cross_entropy(local_logits, c.block(targets, c.k), vocab_start=self.vocab_start,
                                            group=c.axis_j)

    def sync_norm_grads(self) -> None:
        """Sum the norm-weight gradients over the plane (one flat all-reduce);
        after the last backward, before the optimizer step."""
        grads = [p.grad for p in self.norm_params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.cube.plane)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _check(model: Decoder, q: int) -> None:
    cfg = model.cfg
    for what, n, by in (("n_heads", cfg.n_heads, q), ("n_kv_heads", cfg.n_kv_heads, q), ("dim", cfg.dim, q * q),
                        ("ffn_dim", cfg.ffn_dim, q * q), ("vocab_size", cfg.vocab_size, q * q),
                        ("n_heads*head_dim", cfg.n_heads * cfg.head_dim, q * q),
                        ("n_kv_heads*head_dim", cfg.n_kv_heads * cfg.head_dim, q * q)):
        if n % by:
            raise ValueError(f"3D tensor parallelism with q = {q} needs {what} = {n} divisible by {by}")


def _indexed(module: nn.Module, index: tuple[slice, ...]) -> nn.Module:
    module.shard_index = index  # where module.weight sits in the full tensor (tests reassemble from it)
    return module


def apply_tensor_parallel_3d(model: Decoder, cube: Cube) -> TensorParallel3D:
    """Shard ``model`` in place over ``cube`` (every rank holds the same full weights)."""
    _check(model, cube.q)
    cfg, c = model.cfg, cube
    index: dict[str, tuple[slice, ...]] = {}

    def take(name: str, t: torch.Tensor, *, a: int, col: int) -> torch.Tensor:
        index[name] = _block_index(t.shape[0], t.shape[1] if t.dim() == 2 else None, a=a, c=col, cube=c)
        return t.detach()[index[name]].clone()

    def linear(name: str, lin: nn.Linear, layout_in: str, shared: SharedGather | None = None) -> Linear3D:
        a, col = (c.j, c.k) if layout_in == "A" else (c.k, c.j)  # weight block [out, in]
        return _indexed(Linear3D(take(name + ".weight", lin.weight, a=a, col=col), cube=c, layout_in=layout_in,
                                 shared=shared), index[name + ".weight"])

    def norm(name: str, mod: RMSNorm) -> RMSNorm3D:
        return _indexed(RMSNorm3D(take(name + ".weight", mod.weight, a=0, col=c.k), eps=mod.eps, dim=cfg.dim,
                                  cube=c), index[name + ".weight"])

    for n, block in enumerate(model.layers):
        p, attn, ffn = f"layers.{n}.", block.attention, block.feed_forward
        block.attention_norm = norm(p + "attention_norm", block.attention_norm)
        block.ffn_norm = norm(p + "ffn_norm", block.ffn_norm)
        # One input gather per sub-layer, shared by its A → B projections; the
        # model's code and parameter names stay unchanged.
        for sub, names, out in ((attn, ("wq", "wk", "wv"), "wo"), (ffn, ("w1", "w3"), "w2")):
            prefix = p + ("attention." if sub is attn else "feed_forward.")
            shared = SharedGather(c.axis_j)
            for name in names:
                setattr(sub, name, linear(prefix + name, getattr(sub, name), "A", shared))
            setattr(sub, out, linear(prefix + out, getattr(sub, out), "B"))
            sub.register_forward_hook(shared.clear)
    start = c.j * cfg.vocab_size // c.q
    model.tok_embeddings = _indexed(Embedding3D(take("tok_embeddings.weight", model.tok_embeddings.weight, a=c.j,
                                                     col=c.k), start=start, cube=c), index["tok_embeddings.weight"])
    model.norm = norm("norm", model.norm)
    model.output = linear("output", model.output, "A")
    norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm3D)]
    assert set(index) == {name for name, _ in model.named_parameters()}, "every parameter is sharded"
    return TensorParallel3D(cube=c, vocab_start=start, shard_index=index, norm_params=norms)
