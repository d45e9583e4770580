"""Sequence parallelism by ring self-attention (Li et al. 2021, arXiv 2105.13120).

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

from typing import Any

from bench.theory.tensor_parallel import tp_comm_bytes


def ring_sp_comm_bytes(cfg: Any, *, b: int, s: int, ring: int, tp: int = 1, dp: int = 1,
                       bytes_per_value: int = 4) -> float:
    """Bus bytes per rank and step of ring self-attention (arXiv 2105.13120;
    ``impl.ring_attention``), b sequences of s tokens per data-parallel replica
    split into r chunks of s/r; one K plus one V chunk = 2·b·(s/r)·h_a values
    (h_a = n_heads·head_dim: the core's K/V, after the GQA repeat):

    * per layer, forward: r − 1 K/V sends per rank (send bus factor 1);
    * backward: r − 1 K/V sends again (blocks are recomputed from the saved
      LSE) and r − 1 sends of the dK/dV accumulators → 3(r − 1) per layer;
    * the weight gradients, replicated on all W = r·N_d ranks, all-reduced
      over them: 2Ψ(W − 1)/W.

    With tensor parallelism t inside each ring rank (Megatron's context
    parallelism: ring over cp, Megatron 1D TP over tp), each rank's K/V chunk
    holds its n_heads/t heads, and the rank adds Megatron TP's traffic on its
    s/r tokens with the gradient average over its W = r·N_d replicas
    (``tp_comm_bytes`` with s/r and N_d·r; at t = 1 that is the 2Ψ(W − 1)/W above).
    """
    from impl.model_config import total_params

    chunk = 2 * b * (s // ring) * (cfg.n_heads // tp) * cfg.head_dim * bytes_per_value
    p2p = cfg.n_layers * 3 * (ring - 1) * chunk
    w = ring * dp
    if tp == 1:
        return p2p + 2 * total_params(cfg) * bytes_per_value * (w - 1) / w
    return p2p + tp_comm_bytes(cfg, b=b, s=s // ring, tp=tp, dp=w, bytes_per_value=bytes_per_value)
