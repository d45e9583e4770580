"""Sequence parallelism by ring self-attention (Li et al. 2021, arXiv 2105.13120).

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

from typing import Any

from bench.theory.cost import Cost
from bench.theory.tensor_parallel import tp_comm_bytes

RING_SOURCE = ("Li et al. 2021 (sequence parallelism, arXiv 2105.13120) §3.1, ring self-attention: per layer the "
               "forward passes each key chunk (RingQK) and each value chunk (RingAV) N−1 times around the ring; the "
               "backward passes them again and all-reduces the full-length ∂K and ∂V (the authors' RingQK/RingAV, "
               "Colossal-AI legacy): 2(N−1)C + 2(N−1)C + 2·2(N−1)/N·N·C = 8(N−1)C, C = b·(s/N)·h_a values")


def ring_attention_layer_bytes(*, b: int, s: int, heads: int, head_dim: int, ring: int,
                               bytes_per_value: int = 4) -> tuple[float, float]:
    """(forward, backward) bus bytes per rank of one ring self-attention layer as
    Li et al. count it (``RING_SOURCE``), C = b·(s/N)·heads·head_dim values per
    K or V chunk: forward 2(N−1)C (RingQK, RingAV); backward 2(N−1)C of ring
    passes + two full-length all-reduces, 2·2(N−1)/N·N·C."""
    c = b * (s // ring) * heads * head_dim * bytes_per_value
    return 2 * (ring - 1) * c, 6 * (ring - 1) * c


def ring_sp_comm_cost(cfg: Any, *, b: int, s: int, ring: int, tp: int = 1, dp: int = 1,
                      bytes_per_value: int = 4) -> Cost:
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

    c = b * (s // ring) * (cfg.n_heads // tp) * cfg.head_dim * bytes_per_value  # one K (or V) chunk
    w = ring * dp
    paper = sum(ring_attention_layer_bytes(b=b, s=s, heads=cfg.n_heads // tp, head_dim=cfg.head_dim, ring=ring,
                                           bytes_per_value=bytes_per_value))
    cost = (Cost(RING_SOURCE, cfg.n_layers * paper)
            .plus("∂K/∂V travel the ring as accumulators, N−1 sends each, instead of the paper's full-length "
                  "all-reduces (2·2(N−1)C): −2(N−1)C per layer", -cfg.n_layers * 2 * (ring - 1) * c))
    if tp == 1:
        return cost.plus("weight gradients all-reduced over the r·N_d replicas, 2Ψ(W−1)/W (ZeRO §7.1)",
                         2 * total_params(cfg) * bytes_per_value * (w - 1) / w)
    return cost.plus("Megatron TP inside each ring rank on its s/r tokens, with the gradient all-reduce over r·N_d "
                     "replicas (Narayanan et al. 2021 §3; tp_comm_cost)",
                     tp_comm_bytes(cfg, b=b, s=s // ring, tp=tp, dp=w, bytes_per_value=bytes_per_value))


def ring_sp_comm_bytes(cfg: Any, **kw: Any) -> float:
    """``ring_sp_comm_cost``'s total."""
    return ring_sp_comm_cost(cfg, **kw).total
