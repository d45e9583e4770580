"""Pipeline parallelism: the bubble fraction (Huang et al. 2019; Narayanan et al. 2019/2021)
and the point-to-point bytes of a schedule.

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

PIPELINE_SOURCE = ("Narayanan et al. 2021 (arXiv 2104.04473) §3: consecutive pipeline stages exchange bsh values per "
                   "micro-batch in each direction (GPipe, Huang et al. 2019; 1F1B and interleaved, §2.2: a rank "
                   "holding v stages sends across each of its stage boundaries)")


def bubble_fraction(pp: int, microbatches: int, schedule: str, virtual_stages: int = 1) -> float | None:
    """Idle fraction of ideal time: (p−1)/m for GPipe and 1F1B; (p−1)/(v·m) interleaved
    (Narayanan et al. 2021, §2.2). Assumes equal stage times and free communication; for
    measured, unequal op times see ``impl.pipeline_bubble.replay`` (equal to this at equal times)."""
    if pp == 1:
        return None
    if schedule == "interleaved":
        return (pp - 1) / (virtual_stages * microbatches)
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / microbatches
    return None


def pipeline_p2p_bytes(*, pp: int, microbatches: int, micro_batch: int, seq_len: int, dim: int,
                       virtual_stages: int = 1, bytes_per_value: int = 4,
                       backward_sends: int | None = None) -> list[float]:
    """Bus bytes each pipeline rank sends per step (send factor 1; a recv counts 0):
    one (b/m, s, h) hidden state per micro-batch across every stage boundary
    forward, and its gradient backward (GPipe, Huang et al. 2019; 1F1B and
    interleaved, Narayanan et al. 2021 §2.2, loop placement: rank r holds
    stages r, r+p, …, so it sends forward from each stage but the last and
    backward from each but the first). ``backward_sends`` overrides the m
    backward messages per stage (PipeDream's first step runs m − (p−r−1))."""
    act = micro_batch * seq_len * dim * bytes_per_value
    n_stages = pp * virtual_stages
    out = []
    for r in range(pp):
        mine = [r + c * pp for c in range(virtual_stages)]
        fwd = sum(s < n_stages - 1 for s in mine) * microbatches
        bwd_per = microbatches if backward_sends is None else backward_sends
        bwd = sum(s > 0 for s in mine) * (bwd_per if virtual_stages == 1 else microbatches)
        out.append(float((fwd + bwd) * act))
    return out
