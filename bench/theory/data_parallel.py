"""Data-parallel communication per rank and step: DDP/ZeRO volumes (Rajbhandari et al. 2020
§7), all-reduce algorithms (ring, tree, parameter server), 1-bit Adam/LAMB compression
(Tang et al. 2021; Li et al. 2021).

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

from bench.theory.cost import ZERO_SOURCE, Cost

ONEBIT_SOURCE = ("Tang et al. 2021 (1-bit Adam, arXiv 2102.02888) §4, and Li et al. 2021 (1-bit LAMB, arXiv "
                 "2104.06069), the same compressed all-reduce: after the warm-up each worker sends its momentum's "
                 "signs, 1 bit per value, once in a gather (all-to-all) and once in an all-gather of the "
                 "server-compressed chunks: 2·Ψ/8·(N−1)/N bytes per rank; a warm-up step all-reduces the "
                 "gradients like Adam, 2Ψ·4·(N−1)/N")


def dp_comm_cost(psi: float, *, zero: int, dp: int, microbatches: int = 1, bytes_per_value: int = 4) -> Cost:
    """ZeRO's §7 volume (2Ψ, or 3Ψ at stage 3, ×(N−1)/N) and, as a named term,
    what gradient accumulation adds to it: the paper counts one micro-batch,
    while ZeRO-2 reduce-scatters every micro-batch's gradients and ZeRO-3 also
    gathers the parameters again for each (``dp_comm_elements``)."""
    e, m = bytes_per_value, microbatches
    if dp == 1:
        return Cost(ZERO_SOURCE, 0.0)
    paper = (3 if zero == 3 else 2) * psi * (dp - 1) / dp * e
    extra = {0: 0, 1: 0, 2: m - 1, 3: 3 * (m - 1)}[zero] * psi * (dp - 1) / dp * e
    name = ("ZeRO-2 under gradient accumulation: a gradient reduce-scatter per micro-batch, (m−1)Ψ(N−1)/N "
            "(the paper counts one micro-batch)" if zero == 2 else
            "ZeRO-3 under gradient accumulation: parameter gathers and gradient reduce-scatter per "
            "micro-batch, 3(m−1)Ψ(N−1)/N (the paper counts one micro-batch)")
    return Cost(ZERO_SOURCE, paper).plus(name, extra)


def dp_comm_elements(psi: float, *, zero: int, dp: int, microbatches: int = 1) -> float:
    """Elements each rank moves per step (bus volume): DDP, ZeRO-1 and ZeRO-2
    2Ψ(N−1)/N (all-reduce or reduce-scatter + all-gather); ZeRO-3 3Ψ(N−1)/N
    (an extra parameter all-gather in backward).

    With m micro-batches of gradient accumulation, DDP and ZeRO-1 still
    reduce once; ZeRO-2 and ZeRO-3 keep no full gradients, so they
    reduce-scatter every micro-batch (and ZeRO-3 gathers parameters for each
    micro-batch's forward and backward): (m+1)Ψ(N−1)/N and 3mΨ(N−1)/N."""
    return dp_comm_cost(psi, zero=zero, dp=dp, microbatches=microbatches, bytes_per_value=1).total


ALLREDUCE_SOURCE = {
    "ring": "Patarasuk & Yuan 2009 (ring all-reduce, bandwidth-optimal): 2S(N−1)/N sent per rank",
    "tree": "binary-tree reduce then broadcast (Thakur et al. 2005 §4): (1 up + children down)·S at the busiest node",
    "ps": "one parameter server (Li et al. 2014, OSDI): (N−1)·S at the server",
    "ps_sharded": "parameter server sharded over every rank (Li et al. 2014, OSDI): 2S(N−1)/N per rank",
}
ALLREDUCE_SOURCE["backend"] = ALLREDUCE_SOURCE["ring"]


def allreduce_cost(size_bytes: float, n: int, algorithm: str) -> Cost:
    """``allreduce_bytes_sent`` with the algorithm's source."""
    return Cost(ALLREDUCE_SOURCE[algorithm], allreduce_bytes_sent(size_bytes, n, algorithm))


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


def onebit_comm_cost(psi: int, dp: int, *, compressed: bool, bytes_per_grad: int = 4) -> Cost:
    """Tang et al.'s compressed all-reduce (``ONEBIT_SOURCE``) with the two
    things the implementation (DeepSpeed's, and ``impl.onebit``'s after it)
    adds, named: the sign buffer padded to a multiple of 8N values, and one
    fp32 scale per chunk in each of the two phases."""
    if dp == 1:
        return Cost(ONEBIT_SOURCE, 0.0)
    f = (dp - 1) / dp
    if not compressed:
        return Cost(ONEBIT_SOURCE, 2 * psi * f * bytes_per_grad)
    padded = -(-psi // (8 * dp)) * 8 * dp
    return (Cost(ONEBIT_SOURCE, 2 * psi / 8 * f)
            .plus("sign buffer padded to a multiple of 8N values (whole bytes per chunk)", 2 * (padded - psi) / 8 * f)
            .plus("one fp32 scale per chunk in each phase (the paper counts the signs only)", 2 * 4 * dp * f))


def onebit_comm_bytes(psi: int, dp: int, *, compressed: bool, bytes_per_grad: int = 4) -> float:
    """Bus bytes per rank of one 1-bit Adam/LAMB step (Tang et al. 2021): a warm-up
    step all-reduces the gradients, 2Ψ(N−1)/N values; a compressed step sends
    the momentum's signs, 1 bit per value (Ψ padded to a multiple of 8N), plus
    one fp32 scale per rank, once in an all-to-all and once in an all-gather,
    each ×(N−1)/N."""
    return onebit_comm_cost(psi, dp, compressed=compressed, bytes_per_grad=bytes_per_grad).total


def onebit_volume_reduction(warmup_fraction: float, compression: float) -> float:
    """Whole-run volume of full-precision ÷ 1-bit training: 1/(w + (1−w)/r) for
    warm-up fraction w and per-step compression r (Tang et al.'s r = 16 is
    against fp16 gradients; against fp32 r ≈ 32)."""
    return 1 / (warmup_fraction + (1 - warmup_fraction) / compression)
