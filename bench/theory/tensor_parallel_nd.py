"""2D (SUMMA, arXiv 2104.05343), 2.5D (Tesseract, arXiv 2105.14500) and 3D (arXiv 2105.14450)
tensor parallelism: local parameter shapes and communication.

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

import math
from typing import Any


def tp2d_param_shapes(cfg: Any, tp: int, *, depth: int = 1) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape on one rank of a d × q × q grid (``impl.tensor_parallel_2d``,
    tp = q²·d): every matrix and the embedding (O, I) → (O/q, I/q), norm weights D/q."""
    from impl.model_config import param_shapes

    q = math.isqrt(tp // depth)
    if q * q * depth != tp:
        raise ValueError(f"2D/2.5D tensor parallelism needs tp = q²·depth, got tp = {tp}, depth = {depth}")
    return {name: tuple(d // q for d in shape) for name, shape in param_shapes(cfg).items()}


def tp2d_comm_bytes(cfg: Any, *, b: int, s: int, tp: int, depth: int = 1, dp: int = 1, microbatches: int = 1,
                    bytes_per_value: int = 4) -> float:
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
    f = (q - 1) / q

    def ar(g: int) -> float:  # all-reduce bus factor over g ranks
        return 2 * (g - 1) / g

    psi_rank = sum(math.prod(v) for v in shapes.values())
    linears = sum(3 * f * e * (n / q * shape[1] + m * shape[0] * shape[1] / q)  # shape = (O, I)
                  for name, shape in param_shapes(cfg).items() if len(shape) == 2 and name != "tok_embeddings.weight")
    embedding = 2 * f * e * n * h / q
    norms = n_norms * 2 * ar(q) * 4 * n / q + ar(q) * e * n_norms * h / q
    loss = 3 * ar(q) * 4 * n / q + m * ar(q) * 4 + (m * ar(depth) * 4 if depth > 1 else 0.0)
    grads = (ar(depth) if depth > 1 else 0.0) * e * psi_rank + (ar(dp) if dp > 1 else 0.0) * e * psi_rank
    return linears + embedding + norms + loss + grads


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


def tp3d_comm_bytes(cfg: Any, *, b: int, s: int, tp: int, microbatches: int = 1,
                    bytes_per_value: int = 4) -> float:
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

    q = _cube_side(tp)
    n, h, n_norms = b * s, cfg.dim, 2 * cfg.n_layers + 1
    acts, weights = 2 * cfg.n_layers * n * h, 0
    for name, shape in param_shapes(cfg).items():
        if len(shape) == 1:
            continue
        o, i = shape
        weights += o * i
        if name == "tok_embeddings.weight":
            acts += n * h
        else:
            acts += n * o + (n * i if name.endswith(("wo.weight", "w2.weight", "output.weight")) else 0)
    ar = 2 * (q - 1) / q  # all-reduce bus factor over q ranks
    sum_sq = n_norms * 2 * ar * n / q**2 * 4
    loss = 3 * ar * n / q**2 * 4
    norm_grads = 2 * (q * q - 1) / (q * q) * n_norms * h / q * bytes_per_value
    return 2 * (q - 1) / q**3 * (acts + microbatches * weights) * bytes_per_value + sum_sq + loss + norm_grads
