"""2D (SUMMA, arXiv 2104.05343), 2.5D (Tesseract, arXiv 2105.14500) and 3D (arXiv 2105.14450)
tensor parallelism: local parameter shapes and communication.

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

import math
from typing import Any

from bench.theory.cost import Cost, allreduce_bus_factor

TP2D_SOURCE = ("Xu et al. 2021 (Optimus, arXiv 2104.05343) §3: SUMMA on a q×q grid. Per linear Y = XW (n tokens, "
               "W I×O) the forward broadcasts X blocks along rows and W blocks along columns; the backward computes "
               "∂X = ∂Y·Wᵀ (broadcast W, reduce ∂X) and ∂W = Xᵀ·∂Y (broadcast X, reduce ∂W) (the authors' "
               "Matmul_AB/ABT/ATB_2D): 3(q−1)/q²·(nI + IO) values per rank, the weight part once per micro-batch")
TP25D_SOURCE = ("Wang et al. 2021 (Tesseract, arXiv 2105.14500) §3: d SUMMA grids of q×q, each on n/d tokens, "
                "the weights replicated over depth and their gradients all-reduced over it: per linear "
                "3(q−1)/q²·(nI/d + IO) + 2(d−1)/d·IO/q² values per rank (Optimus's SUMMA per depth layer)")
TP3D_SOURCE = ("Bian et al. 2021 (3D TP, arXiv 2105.14450) §3, Alg. 1–2: per linear the forward all-gathers X "
               "and W and reduce-scatters Y, the backward all-gathers ∂Y and reduce-scatters ∂X and ∂W, each over "
               "q ranks of a 1/q² block: 2(q−1)/q³·(nI + nO + IO) values per rank, the weight part once per "
               "micro-batch")


def summa_linear_bytes(*, n: float, i: int, o: int, q: int, microbatches: int = 1, bytes_per_value: int = 4) -> float:
    """One linear (I → O) on n tokens of a q×q SUMMA grid, bus bytes per rank and step
    (``TP2D_SOURCE``): 3(q−1)/q²·(n·I + m·I·O)·e."""
    return 3 * (q - 1) / q**2 * (n * i + microbatches * i * o) * bytes_per_value


def cube_linear_bytes(*, n: float, i: int, o: int, q: int, microbatches: int = 1, bytes_per_value: int = 4) -> float:
    """One linear (I → O) on n tokens of a q×q×q cube, bus bytes per rank and step
    (``TP3D_SOURCE``): 2(q−1)/q³·(n·I + n·O + m·I·O)·e."""
    return 2 * (q - 1) / q**3 * (n * i + n * o + microbatches * i * o) * bytes_per_value


TP_ND_LOSS_TERM = "vocab-parallel cross-entropy (Megatron's): 3 fp32 all-reduces of the rank's tokens over q ranks"


def tp2d_param_shapes(cfg: Any, tp: int, *, depth: int = 1) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape on one rank of a d × q × q grid (``impl.tensor_parallel_2d``,
    tp = q²·d): every matrix and the embedding (O, I) → (O/q, I/q), norm weights D/q."""
    from impl.model_config import param_shapes

    q = math.isqrt(tp // depth)
    if q * q * depth != tp:
        raise ValueError(f"2D/2.5D tensor parallelism needs tp = q²·depth, got tp = {tp}, depth = {depth}")
    return {name: tuple(d // q for d in shape) for name, shape in param_shapes(cfg).items()}


def tp2d_comm_cost(cfg: Any, *, b: int, s: int, tp: int, depth: int = 1, dp: int = 1, microbatches: int = 1,
                   bytes_per_value: int = 4) -> Cost:
    """Bus bytes per rank and step of 2D (SUMMA, Xu et al. arXiv 2104.05343) or
    2.5D (Tesseract, arXiv 2105.14500) TP as ``impl.tensor_parallel_2d`` runs it:
    b sequences of s tokens per data-parallel replica, n = b·s/d tokens on each
    depth layer's q × q grid, f = (q−1)/q (all-gather / reduce-scatter bus
    factor), e bytes per value, m micro-batches:

    * each linear (O, I) (wq wk wv wo w1 w3 w2 per block, the head): SUMMA's
      input and weight all-gathers in forward and again in backward plus the
      ∂X and ∂W reduce-scatters: 3f·e·(n/q·I + m·I·O/q);
    * the embedding: reduce-scatter of (n, D/q) forward, all-gather backward: 2f·e·n·D/q;
    * RMSNorm: Σx² of n/q tokens all-reduced over the row forward and backward
      (fp32), 2L+1 norms; their weight gradients summed over the column, 2f·e·(2L+1)·D/q;
    * vocab-parallel loss: 3 all-reduces of n/q fp32 values over the row, and
      the mean over rows (and depth layers) of one fp32 value per micro-batch;
    * 2.5D: every gradient summed over the depth group, 2Ψ_rank·(d−1)/d;
      data parallel on top: 2Ψ_rank·(N_d−1)/N_d.
    """
    from impl.model_config import param_shapes

    shapes = tp2d_param_shapes(cfg, tp, depth=depth)
    q, m, e = math.isqrt(tp // depth), microbatches, bytes_per_value
    n, h, n_norms = b * s / depth, cfg.dim, 2 * cfg.n_layers + 1
    f, ar = (q - 1) / q, allreduce_bus_factor

    def summa(o: int, i: int) -> float:  # one linear, weight (O, I)
        return summa_linear_bytes(n=n, i=i, o=o, q=q, microbatches=m, bytes_per_value=e)

    full = param_shapes(cfg)
    blocks = [v for k, v in full.items() if k.startswith("layers.") and len(v) == 2]
    block_weights = sum(o * i for o, i in blocks) / q**2
    psi_rank = sum(math.prod(v) for v in shapes.values())
    depth_grads = ar(depth) * e * block_weights if depth > 1 else 0.0
    cost = Cost(TP25D_SOURCE if depth > 1 else TP2D_SOURCE, sum(summa(o, i) for o, i in blocks) + depth_grads)
    return (cost
            .plus("the head: one more SUMMA linear (D → V), outside the per-layer count", summa(*full["output.weight"]))
            .plus("embedding: reduce-scatter of (n, D/q) forward, all-gather backward, 2(q−1)/q·n·D/q",
                  2 * f * e * n * h / q)
            .plus("RMSNorm (the papers' LayerNorm has two statistics): Σx² of n/q tokens all-reduced over the row, "
                  "forward and backward, 2L+1 norms", n_norms * 2 * ar(q) * 4 * n / q)
            .plus("norm weights: gradients summed over the column", ar(q) * e * n_norms * h / q)
            .plus(TP_ND_LOSS_TERM + ", and the mean over rows (and depth layers) of one value per micro-batch",
                  3 * ar(q) * 4 * n / q + m * ar(q) * 4 + (m * ar(depth) * 4 if depth > 1 else 0.0))
            .plus("embedding, head and norm gradients all-reduced over depth",
                  ar(depth) * e * (psi_rank - block_weights) if depth > 1 else 0.0)
            .plus("data-parallel gradient all-reduce of the rank's shard, 2Ψ_rank(N_d−1)/N_d (ZeRO §7.1)",
                  ar(dp) * e * psi_rank if dp > 1 else 0.0))


def tp2d_comm_bytes(cfg: Any, **kw: Any) -> float:
    """``tp2d_comm_cost``'s total."""
    return tp2d_comm_cost(cfg, **kw).total


def _cube_side(tp: int) -> int:
    q = round(tp ** (1 / 3))
    if q**3 != tp:
        raise ValueError(f"3D tensor parallelism needs tp = q³, got tp = {tp}")
    return q


def tp3d_param_shapes(cfg: Any, tp: int) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape on one rank of a q×q×q cube (``impl.tensor_parallel_3d``):
    every matrix (O, I) → (O/q², I/q), each norm weight → its D/q slice."""
    from impl.model_config import param_shapes

    q = _cube_side(tp)
    return {name: (s[0] // q**2, s[1] // q) if len(s) == 2 else (s[0] // q,)
            for name, s in param_shapes(cfg).items()}


def tp3d_local_params(cfg: Any, tp: int) -> int:
    """Parameters one rank holds: Ψ_matrices/q³ plus (2L+1)·D/q of norm weights."""
    return sum(s[0] * (s[1] if len(s) == 2 else 1) for s in tp3d_param_shapes(cfg, tp).values())


def tp3d_comm_cost(cfg: Any, *, b: int, s: int, tp: int, microbatches: int = 1,
                   bytes_per_value: int = 4) -> Cost:
    """Bus bytes per rank and step of 3D TP (``impl.tensor_parallel_3d``, whose
    docstring derives it), b sequences of s tokens, N = b·s, cube side q, and
    c = 2(q−1)/q³ for a forward + backward pair of all-gather / reduce-scatter:

    * each linear (O, I): its output reduce-scatter and the output gradient's
      gather, N·O; its input gather and input-gradient reduce-scatter, N·I (wo,
      w2 and the head; wq/wk/wv and w1/w3 share one gather per sub-layer, N·D
      each, 2L of them); the weight gather and weight-gradient reduce-scatter,
      O·I per micro-batch; the embedding, N·D and V·D per micro-batch;
    * RMSNorm: Σx² all-reduced over q ranks forward and backward, N/q² fp32
      values each, 2L+1 norms;
    * vocab-parallel loss: 3 all-reduces of N/q² fp32 values over q ranks;
    * the norm-weight gradients, (2L+1)·D/q values all-reduced over q² ranks.
    """
    from impl.model_config import param_shapes

    q, m, e = _cube_side(tp), microbatches, bytes_per_value
    n, h, L, n_norms = b * s, cfg.dim, cfg.n_layers, 2 * cfg.n_layers + 1
    c = 2 * (q - 1) / q**3 * e

    def cube(o: int, i: int) -> float:  # one linear, weight (O, I)
        return cube_linear_bytes(n=n, i=i, o=o, q=q, microbatches=m, bytes_per_value=e)

    full = param_shapes(cfg)
    blocks = [v for k, v in full.items() if k.startswith("layers.") and len(v) == 2]
    v_size = full["output.weight"][0]
    ar = allreduce_bus_factor(q)
    return (Cost(TP3D_SOURCE, sum(cube(o, i) for o, i in blocks))
            .plus("wq/wk/wv and w1/w3 gather their common input once per sub-layer: 3 fewer N·D gathers per block",
                  -c * 3 * L * n * h)
            .plus("the head: one more 3D linear (D → V), outside the per-layer count", cube(v_size, h))
            .plus("embedding: the 3D matmul of one-hot ids, which every rank holds (no input gather)",
                  c * (n * h + m * v_size * h))
            .plus("RMSNorm (the paper's LayerNorm has two statistics): Σx² all-reduced over q ranks forward and "
                  "backward, N/q² fp32 values, 2L+1 norms", n_norms * 2 * ar * n / q**2 * 4)
            .plus(TP_ND_LOSS_TERM, 3 * ar * n / q**2 * 4)
            .plus("norm-weight gradients all-reduced over the q² ranks of a plane",
                  allreduce_bus_factor(q * q) * n_norms * h / q * bytes_per_value))


def tp3d_comm_bytes(cfg: Any, **kw: Any) -> float:
    """``tp3d_comm_cost``'s total."""
    return tp3d_comm_cost(cfg, **kw).total
