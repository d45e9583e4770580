"""A communication prediction split into the paper's own cost and named terms.

The paper term is the cost analysis of the paper that introduced the technique,
evaluated as the paper states it (its ``source`` cites the section and restates
the formula, so a reader can check it). Every place where TrainBench's decoder or
implementation legitimately differs (an embedding or a loss the paper's per-layer
count leaves out, RMSNorm instead of LayerNorm, padding, a cheaper backward) is a
separate term with a name saying what it is and why; a term may be negative.

The record keeps all of it (``theory.comm_cost``) and ``comm_bytes_per_step`` is
the sum, so the report can show measured ÷ (paper + terms) and how much of the
prediction the paper alone accounts for.

Pure Python, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Cost:
    """Bus bytes per rank and step: ``paper`` by ``source``, plus named ``terms``."""

    source: str
    """The paper, section and formula of ``paper``."""
    paper: float
    terms: dict[str, float] = field(default_factory=dict)
    """Name (what differs from the paper and why) → bytes."""

    @property
    def total(self) -> float:
        return self.paper + sum(self.terms.values())

    def plus(self, name: str, value: float) -> Cost:
        """This cost with one more named term (dropped when it is zero)."""
        if value == 0:
            return self
        if name in self.terms:
            raise ValueError(f"term {name!r} counted twice")
        return Cost(self.source, self.paper, {**self.terms, name: value})

    def record(self) -> dict:
        return {"source": self.source, "paper_bytes": self.paper, "terms": dict(self.terms),
                "total_bytes": self.total}


def add(costs: list[Cost]) -> Cost:
    """The sum of costs with one source each (pipeline ranks' stages, a rank's parts):
    paper terms add, terms with the same name add."""
    if len({c.source for c in costs}) != 1:
        raise ValueError(f"costs from different sources: {sorted({c.source for c in costs})}")
    terms: dict[str, float] = {}
    for c in costs:
        for k, v in c.terms.items():
            terms[k] = terms.get(k, 0.0) + v
    return Cost(costs[0].source, sum(c.paper for c in costs), {k: v for k, v in terms.items() if v})


ZERO_SOURCE = ("Rajbhandari et al. 2020 (ZeRO, arXiv 1910.02054) §7.1–7.2: DDP, ZeRO-1 and ZeRO-2 move 2Ψ "
               "per step (all-reduce = reduce-scatter + all-gather), ZeRO-3 3Ψ; per rank ×(N_d−1)/N_d")


def allreduce_bus_factor(n: int) -> float:
    """Bus bytes of a ring all-reduce per byte reduced: 2(n−1)/n (Patarasuk & Yuan 2009)."""
    return 2 * (n - 1) / n if n > 1 else 0.0
