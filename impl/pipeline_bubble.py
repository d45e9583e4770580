"""The pipeline bubble, from measured per-stage timelines and from a zero-cost replay.

Definitions (one pipeline of p ranks, one synchronous step; Narayanan et al.
2021 §2.2 state the bubble as idle time over *ideal* compute time):

* measured: the step's makespan T is stage 0's span — its first forward starts
  the step and its last backward ends it in GPipe, 1F1B and interleaved
  alike, so T needs one rank's clock only. Each rank r is busy B_r (forward
  + backward compute, receive waits excluded) and idle T − B_r, and

      bubble = Σ_r (T − B_r) / Σ_r B_r.

* theory, equal stage times and free communication: (p−1)/m, or (p−1)/(v·m)
  interleaved (``bench.theory.bubble_fraction``).
* theory for the measured stage times: ``replay`` runs the very same per-rank
  op orders, each forward and backward taking the duration it was measured
  to take in that step (so every rank's replayed busy time is its measured
  one), with zero-cost communication, and the bubble above is read off that
  ideal timeline. With f_s = f, b_s = b on every stage it is exactly (p−1)/m
  (GPipe: stage s starts F(i) at (s+i)·f, the last stage turns around at
  (m+p−1)·f, and stage 0 ends at (m+p−1)(f+b), so every rank idles
  (p−1)(f+b) against m(f+b) busy). With unequal stages the slowest one paces
  the steady state and every other rank idles the difference each
  micro-batch, so the bubble no longer falls as 1/m: it tends to
  p·max_s t_s ÷ Σ_s t_s − 1 as m grows. Measured ÷ this figure isolates what
  the executor adds (point-to-point latency, Python overhead, waits for the
  CPU) from what the partition and the op durations force.
"""
from __future__ import annotations

from typing import Iterable

Event = tuple[str, int, int, float, float]  # (op, micro, chunk, start_s, end_s) — StepStats.timeline


def span_s(timeline: Iterable[Event]) -> float:
    """First start to last end of one rank's step."""
    events = list(timeline)
    return max(e[4] for e in events) - min(e[3] for e in events) if events else 0.0


def busy_s(timeline: Iterable[Event]) -> float:
    return sum(e[4] - e[3] for e in timeline)


def bubble(makespan_s: float, busy_by_rank: list[float]) -> float:
    """Σ_r (T − B_r) ÷ Σ_r B_r: pipeline idle over pipeline compute."""
    total = sum(busy_by_rank)
    return (len(busy_by_rank) * makespan_s - total) / total


def replay(orders: list[list[tuple[str, int, int]]], durations: list[list[float]]) -> list[list[Event]]:
    """Execute per-rank op orders, op ``orders[r][i]`` taking ``durations[r][i]`` seconds, with free
    communication: an op starts when its rank is free and its input exists — F(i) on stage s
    needs F(i) on s−1; B(i) on s needs B(i) on s+1 (the last stage's B needs only its own F,
    earlier in its order). Stage of chunk c on rank r: r + c·p. Raises if the orders deadlock."""
    pp = len(orders)
    last = max(r + c * pp for r, order in enumerate(orders) for _, _, c in order)
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * pp
    pos = [0] * pp
    out: list[list[Event]] = [[] for _ in range(pp)]
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                op, micro, chunk = orders[r][pos[r]]
                stage = r + chunk * pp
                dep = (("F", micro, stage - 1) if stage > 0 else None) if op == "F" else \
                      (("B", micro, stage + 1) if stage < last else None)
                if dep is not None and dep not in done:
                    break
                start = max(free[r], done[dep] if dep else 0.0)
                end = start + durations[r][pos[r]]
                done[(op, micro, stage)] = free[r] = end
                out[r].append((op, micro, chunk, start, end))
                pos[r] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"pipeline orders deadlock at positions {pos}")
    return out


def replay_bubble(orders: list[list[tuple[str, int, int]]], durations: list[list[float]]) -> float:
    """The bubble of the ideal (communication-free) run of ``orders`` at op ``durations``."""
    lanes = replay(orders, durations)
    return bubble(span_s(lanes[0]), [busy_s(lane) for lane in lanes])


def stage_durations(orders: list[list[tuple[str, int, int]]], forward_s: list[float],
                    backward_s: list[float]) -> list[list[float]]:
    """Durations aligned with ``orders`` when every F on stage s takes forward_s[s] and every B backward_s[s]."""
    pp = len(orders)
    return [[(forward_s if op == "F" else backward_s)[r + c * pp] for op, _, c in order]
            for r, order in enumerate(orders)]
