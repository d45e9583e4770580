"""Data-parallel communication per rank and step: DDP/ZeRO volumes (Rajbhandari et al. 2020
§7), all-reduce algorithms (ring, tree, parameter server), 1-bit Adam/LAMB compression
(Tang et al. 2021; Li et al. 2021).

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations


def dp_comm_elements(psi: float, *, zero: int, dp: int, microbatches: int = 1) -> float:
    """Elements each rank moves per step (bus volume): DDP, ZeRO-1 and ZeRO-2
    2Ψ(N−1)/N (all-reduce or reduce-scatter + all-gather); ZeRO-3 3Ψ(N−1)/N
    (an extra parameter all-gather in backward).

    With m micro-batches of gradient accumulation, DDP and ZeRO-1 still
    reduce once; ZeRO-2 and ZeRO-3 keep no full gradients, so they
    reduce-scatter every micro-batch (and ZeRO-3 gathers parameters for each
    micro-batch's forward and backward): (m+1)Ψ(N−1)/N and 3mΨ(N−1)/N."""
    if dp == 1:
        return 0.0
    m = microbatches
    factor = {0: 2, 1: 2, 2: m + 1, 3: 3 * m}[zero]
    return factor * psi * (dp - 1) / dp


def allreduce_bytes_sent(size_bytes: float, n: int, algorithm: str) -> float:
    """Bytes the busiest rank sends for one all-reduce of ``size_bytes`` (impl/allreduce.py):
    ring and sharded PS 2S(N−1)/N; binary tree (1 up + children down)·S at the
    busiest node; single parameter server (N−1)·S at the server."""
    if n == 1:
        return 0.0
    if algorithm in ("backend", "ring", "ps_sharded"):
        return 2 * size_bytes * (n - 1) / n
    if algorithm == "tree":
        busiest = max((r > 0) + sum(c < n for c in (2 * r + 1, 2 * r + 2)) for r in range(n))
        return busiest * size_bytes
    if algorithm == "ps":
        return (n - 1) * size_bytes
    raise ValueError(f"unknown all-reduce algorithm {algorithm!r}")


def onebit_comm_bytes(psi: int, dp: int, *, compressed: bool, bytes_per_grad: int = 4) -> float:
    """Bus bytes per rank of one 1-bit Adam/LAMB step (Tang et al. 2021): a warm-up
    step all-reduces the gradients, 2Ψ(N−1)/N values; a compressed step sends
    the momentum's signs, 1 bit per value (Ψ padded to a multiple of 8N), plus
    one fp32 scale per rank, once in an all-to-all and once in an all-gather,
    each ×(N−1)/N."""
    if dp == 1:
        return 0.0
    if not compressed:
        return 2 * psi * (dp - 1) / dp * bytes_per_grad
    padded = -(-psi // (8 * dp)) * 8 * dp
    return 2 * (padded // 8 + 4 * dp) * (dp - 1) / dp


def onebit_volume_reduction(warmup_fraction: float, compression: float) -> float:
    """Whole-run volume of full-precision ÷ 1-bit training: 1/(w + (1−w)/r) for
    warm-up fraction w and per-step compression r (DESIGN.md's r = 16 is
    against fp16 gradients; against fp32 r ≈ 32)."""
    return 1 / (warmup_fraction + (1 - warmup_fraction) / compression)
