"""2D tensor parallelism (SUMMA; Xu et al., arXiv 2104.05343, Colossal-AI's
``Linear2D``), applied to ``impl.model.Decoder`` from outside.

Layout on a q × q grid, rank (i, j) (tp rank = i·q + j; row group = same i,
members ordered by j; column group = same j, ordered by i):

* activations X (b, s, h) of the grid's b sequences: rank (i, j) holds
  X[i, j] = sequences [i·b/q, (i+1)·b/q), features [j·h/q, (j+1)·h/q) —
  (b/q, s, h/q). Attention heads are whole: column j holds heads
  [j·nh/q, (j+1)·nh/q) (and the same block of key/value heads), so the core
  runs locally on (b/q, nh/q, s, hd).
* every linear Y = X Wᵀ, W (out, in) as in nn.Linear: rank (i, j) holds
  W[j, i] = rows (out) block j, columns (in) block i — (out/q, in/q), Ψ/q².
  :func:`summa_linear` computes Y[i, j] = Σ_k X[i, k] W[j, k]ᵀ, the output in
  the input's layout. SUMMA broadcasts X[i, k] along row i and W[j, k] along
  column j for k = 0..q−1; we issue the same traffic as one all-gather of
  X[i, :] over the row group and one of W[j, :] over the column group (a
  broadcast of every block is an all-gather). Backward repeats both gathers
  (only the local blocks are saved, so no rank ever keeps a gathered weight)
  and reduce-scatters ∂X (summed over j, row group) and ∂W (summed over i,
  column group): the forward SUMMA plus the ABᵀ and AᵀB SUMMAs of the paper.
* ``tok_embeddings`` (V, h): rank (i, j) holds rows (vocabulary) block i,
  columns block j — (V/q, h/q). It looks up all b sequences (ids outside its
  vocabulary block give 0) and reduce-scatters the partial (b, s, h/q) over the
  column group along the batch, so rank (i, j) keeps its X[i, j]
  (Colossal-AI's ``VocabParallelEmbedding2D``); backward all-gathers ∂X.
* RMSNorm: weight block j (h/q), replicated over the column group (and
  depth); the mean of squares is a local sum all-reduced over the row group
  (forward, and its gradient in backward). The weight gradient covers only
  b/q sequences: :meth:`TensorParallel2D.sync_grads` sums it over the column group.
* ``output`` is a SUMMA linear over the vocabulary: logits (b/q, s, V/q),
  vocabulary block j, go to ``impl.tp_comm.vocab_parallel_cross_entropy`` over
  the row group (never gathered); the grid's loss is the mean over the q rows
  (:func:`mean_over`: an all-reduce of one value, gradient ÷ q, no traffic).

Communication per rank and step (bus bytes, f = (q−1)/q, n tokens on the grid,
e bytes per value, m micro-batches; ``bench.theory.tp2d_comm_bytes``):

    linears  Σ_lin 3f·e·(n/q·in + m·in·out/q)        (AG X, AG W forward; AG X, AG W, RS ∂X, RS ∂W backward)
    norms    (2L+1)·2·2f·e·n/q  +  2f·e·(2L+1)·h/q    (Σx² fwd + bwd all-reduce; weight gradients)
    embed    2f·e·n·h/q                               (RS fwd, AG bwd)
    loss     3·2f·4·n/q  +  m·2f·4                    (vocab-parallel CE; the mean over the rows)

Memory per rank: every linear (attention, MLP, head) and the embedding
Ψ/q²; the 2L+1 norm vectors h/q each (replicated q times); activations
(b/q)·s·h/q between layers; transient gathered blocks X[i, :] and W[j, :]
inside one linear, and the embedding's partial (b, s, h/q).

Weights are sliced from the full (same-seed) model in place, so the sharded
model computes the unsharded model's function. 2.5D (``impl.tensor_parallel_2p5d``)
runs this grid on each of d depth layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from impl.model import Decoder, RMSNorm
from impl.parallel_dims import ParallelDims
from impl.tp_comm import all_gather_along as _all_gather
from impl.tp_comm import reduce_scatter_along as _reduce_scatter
from impl.tp_comm import vocab_parallel_cross_entropy


# ---- the grid ----

@dataclass(frozen=True, slots=True)
class Grid:
    """This rank's place on a dp × (d × q × q) grid and its process groups.
    tp rank = k·q² + i·q + j (depth k slowest, column j fastest)."""

    q: int
    depth: int
    i: int
    """Row: this rank's sequence block (and vocabulary block of the embedding)."""
    j: int
    """Column: this rank's feature block (heads, vocabulary block of the logits)."""
    k: int
    """Depth layer (2.5D); 0 in 2D."""
    row: object
    """Same (dp, k, i), members ordered by j."""
    col: object
    """Same (dp, k, j), members ordered by i."""
    depth_group: object | None
    """Same (dp, i, j), members ordered by k; None when depth = 1."""
    dp_group: object | None
    """Same (k, i, j) on every data-parallel replica; None when dp = 1."""

    def group(self, axis: str):
        """The group whose members differ in ``axis`` ('i': column group, 'j': row group)."""
        return self.col if axis == "i" else self.row

    def index(self, axis: str) -> int:
        return self.i if axis == "i" else self.j


def new_grid(dims: ParallelDims, *, depth: int = 1) -> Grid:
    """Build every row, column, depth and dp group of the grid; collective: all
    ranks call it, creating the groups in the same order (``dist.new_group``)."""
    if dims.pp != 1:
        raise ValueError(f"2D/2.5D tensor parallelism is not composed with pp = {dims.pp}")
    q = math.isqrt(dims.tp // depth)
    if q < 2 or q * q * depth != dims.tp:
        raise ValueError(f"tp = {dims.tp} is not q*q*depth with q >= 2 (depth = {depth})")
    # (dp, k, i, j) of every rank; pp = 1, so tp rank = coords[2].
    pos = [(c[0], c[2] // (q * q), c[2] // q % q, c[2] % q) for c in map(dims.coords, range(dims.world_size))]
    me = pos[dist.get_rank()]

    def groups(key, order):
        mine = None
        for value in sorted({key(p) for p in pos}):
            members = sorted((r for r, p in enumerate(pos) if key(p) == value), key=lambda r: order(pos[r]))
            g = dist.new_group(members)
            if key(me) == value:
                mine = g
        return mine

    row = groups(lambda p: (p[0], p[1], p[2]), lambda p: p[3])
    col = groups(lambda p: (p[0], p[1], p[3]), lambda p: p[2])
    depth_group = groups(lambda p: (p[0], p[2], p[3]), lambda p: p[1]) if depth > 1 else None
    dp_group = groups(lambda p: (p[1], p[2], p[3]), lambda p: p[0]) if dims.dp > 1 else None
    return Grid(q=q, depth=depth, i=me[2], j=me[3], k=me[1], row=row, col=col, depth_group=depth_group,
                dp_group=dp_group)


class _Summa(torch.autograd.Function):
    """Y[i, j] = X[i, :] · W[j, :]ᵀ; X[i, j] (..., in/q), W[j, i] (out/q, in/q)."""

    @staticmethod
    def forward(ctx, x, w, grid):
        ctx.grid = grid
        ctx.save_for_backward(x, w)
        return F.linear(_all_gather(x, -1, grid.row), _all_gather(w, 1, grid.col))  # (..., out/q)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        g = ctx.grid
        x_row, w_col = _all_gather(x, -1, g.row), _all_gather(w, 1, g.col)  # (..., in), (out/q, in)
        dx = _reduce_scatter(dy @ w_col, -1, g.row)  # Σ_j dY[i, j] W[j, :] → block (i, j)
        dw = dy.flatten(0, -2).t() @ x_row.flatten(0, -2)  # (out/q, in), partial over the q rows i
        return dx, _reduce_scatter(dw, 1, g.col), None


class _AllReduceBoth(torch.autograd.Function):
    """s = Σ_group x, used by every member: all-reduce forward and backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


class _ReduceScatterBatch(torch.autograd.Function):
    """(b, ...) partial sums → this rank's (b/n, ...) block of the sum; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0, ctx.group), None


class _MeanOver(torch.autograd.Function):
    """The mean of one value over a group, each member passing back only its own
    share (grad/n): the members' values come from disjoint data."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.n = dist.get_world_size(group)
        out = x.detach().clone()
        dist.all_reduce(out, group=group)
        return out / ctx.n

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.n, None


def summa_linear(x: torch.Tensor, weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    return _Summa.apply(x, weight, grid)


def mean_over(x: torch.Tensor, group) -> torch.Tensor:
    return _MeanOver.apply(x, group)


# ---- layers ----

# Which grid axis splits each dim of a parameter ('i': rows, 'j': columns, None: whole).
Layout = tuple[str | None, ...]
LINEAR: Layout = ("j", "i")
EMBEDDING: Layout = ("i", "j")
NORM: Layout = ("j",)


def block_of(full: torch.Tensor, layout: Layout, grid: Grid) -> torch.Tensor:
    """This rank's block of a full tensor."""
    out = full.detach()
    for dim, axis in enumerate(layout):
        if axis:
            if out.shape[dim] % grid.q:
                raise ValueError(f"dimension {dim} of size {out.shape[dim]} is not divisible by q = {grid.q}")
            out = out.chunk(grid.q, dim)[grid.index(axis)]
    return out.clone()


class Linear2D(nn.Module):
    """SUMMA linear: weight block W[j, i] (out/q, in/q); (b/q, s, in/q) → (b/q, s, out/q)."""

    def __init__(self, weight: torch.Tensor, grid: Grid) -> None:
        super().__init__()
        self.weight, self.grid = nn.Parameter(weight), grid

    @classmethod
    def from_linear(cls, linear: nn.Linear, grid: Grid) -> "Linear2D":
        if linear.bias is not None:
            raise ValueError("biased linears are not sharded (the decoder has none)")
        return cls(block_of(linear.weight, LINEAR, grid), grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return summa_linear(x, self.weight, self.grid)


class RMSNorm2D(nn.Module):
    """RMSNorm over h split across the row group: x (b/q, s, h/q), weight block j."""

    def __init__(self, norm: RMSNorm, grid: Grid) -> None:
        super().__init__()
        self.weight = nn.Parameter(block_of(norm.weight, NORM, grid))
        self.eps, self.dim, self.grid = norm.eps, norm.weight.shape[0], grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = _AllReduceBoth.apply(xf.pow(2).sum(-1, keepdim=True), self.grid.row)  # (b/q, s, 1)
        return (xf * torch.rsqrt(sum_sq / self.dim + self.eps)).type_as(x) * self.weight


class Embedding2D(nn.Module):
    """Table block (V/q, h/q): vocabulary block i, features block j. Takes all b
    sequences' ids, returns this rank's (b/q, s, h/q)."""

    def __init__(self, emb: nn.Embedding, grid: Grid) -> None:
        super().__init__()
        self.weight, self.grid = nn.Parameter(block_of(emb.weight, EMBEDDING, grid)), grid
        self.start = grid.i * self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.weight.shape[0])
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (b, s, h/q) partial
        return _ReduceScatterBatch.apply(out, self.grid.col)


@dataclass(kw_only=True, slots=True)
class TensorParallel2D:
    """What ``apply_tensor_parallel_2d`` did, and the calls a training step needs."""

    grid: Grid
    vocab_start: int
    """First vocabulary id of this rank's logits (column j)."""
    layouts: dict[str, Layout] = field(default_factory=dict)
    """Parameter name → how its dims are split over the grid."""
    norm_params: list[nn.Parameter] = field(default_factory=list)
    """Replicated over the column group: gradients are partial sums over the rows."""

    def local_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model takes the grid's (b, s) ids (the embedding scatters them);
        the loss takes this row's (b/q, s) targets."""
        if inputs.shape[0] % self.grid.q:
            raise ValueError(f"batch of {inputs.shape[0]} sequences is not divisible by q = {self.grid.q}")
        return inputs, targets.chunk(self.grid.q)[self.grid.i]

    def loss(self, local_logits: torch.Tensor, local_targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the grid's tokens, from (b/q, s, V/q) logits;
        the same on every rank of the grid."""
        row_mean = vocab_parallel_cross_entropy(local_logits, local_targets, vocab_start=self.vocab_start,
                                                group=self.grid.row)
        return mean_over(row_mean, self.grid.col)

    def sync_grads(self) -> None:
        """Sum the norm weights' gradients over the column group (one flat
        all-reduce); after the last backward, before the optimizer step."""
        all_reduce_grads(self.norm_params, self.grid.col)

    def full_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Gather a parameter-shaped block (weight or gradient) back to full shape (collective)."""
        for dim, axis in enumerate(self.layouts[name]):
            if axis:
                t = _all_gather(t, dim, self.grid.group(axis))
        return t


def all_reduce_grads(params: list[nn.Parameter], group) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def apply_tensor_parallel_2d(model: Decoder, grid: Grid) -> TensorParallel2D:
    """Shard ``model`` in place over ``grid`` (every rank holds the same full weights)."""
    cfg, q = model.cfg, grid.q
    for what, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("dim", cfg.dim),
                    ("ffn_dim", cfg.ffn_dim), ("vocab_size", cfg.vocab_size)):
        if n % q:
            raise ValueError(f"2D grid side q = {q} does not divide {what} = {n}")
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        for name in ("wq", "wk", "wv", "wo"):
            setattr(attn, name, Linear2D.from_linear(getattr(attn, name), grid))
        for name in ("w1", "w3", "w2"):
            setattr(ffn, name, Linear2D.from_linear(getattr(ffn, name), grid))
        block.attention_norm = RMSNorm2D(block.attention_norm, grid)
        block.ffn_norm = RMSNorm2D(block.ffn_norm, grid)
    model.norm = RMSNorm2D(model.norm, grid)
    model.tok_embeddings = Embedding2D(model.tok_embeddings, grid)
    model.output = Linear2D.from_linear(model.output, grid)

    layouts, norms = {}, []
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        layouts[name] = {Linear2D: LINEAR, Embedding2D: EMBEDDING, RMSNorm2D: NORM}[type(module)]
        if isinstance(module, RMSNorm2D):
            norms.append(p)
    return TensorParallel2D(grid=grid, vocab_start=grid.j * cfg.vocab_size // q, layouts=layouts, norm_params=norms)
