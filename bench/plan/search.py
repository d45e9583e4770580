"""Pruned enumeration of parallel plans, ranked by predicted step time.

The space: tp over divisors of the world size that divide the key/value heads
(1D Megatron TP), pp over divisors that divide the layers, dp the rest; the
micro-batch count over divisors of the replica's batch (powers of two up to
``max_microbatches``); ZeRO 0–3; offload none / optimizer / optimizer+params;
checkpointing none / selective / full; Megatron sequence parallel with tp > 1.
A candidate is pruned, with its reason counted, when the knobs reject it
(``bench.config.knobs.Knobs``), when ``why_not`` (the adapter's capabilities) does,
or when its predicted memory exceeds the budget. The rest are ranked by
predicted step time, then memory (Alpa and Galvatron search the same axes;
this is their brute-force baseline, small enough to enumerate exactly).
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from bench.plan.cost_model import Estimate, estimate
from bench.plan.machine import MachineProfile

PLAN_KNOBS = ("dp", "tp", "pp", "microbatches", "zero", "offload", "checkpointing", "sequence_parallel")
"""The knobs a plan sets; every other knob comes from the base cell."""


@dataclass(slots=True)
class Plan:
    knobs: Any
    """The resolved, validated ``bench.config.knobs.Knobs`` of the plan."""
    estimate: Estimate

    def choice(self) -> dict[str, Any]:
        return {k: getattr(self.knobs, k) for k in PLAN_KNOBS}

    def label(self) -> str:
        c = self.choice()
        parts = [f"dp{c['dp']}", f"tp{c['tp']}", f"pp{c['pp']}", f"m{c['microbatches']}", f"zero{c['zero']}"]
        if c["offload"] != "none":
            parts.append(f"offload:{c['offload']}")
        if c["checkpointing"] != "none":
            parts.append(f"ckpt:{c['checkpointing']}")
        if c["sequence_parallel"] != "none":
            parts.append("sp")
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"choice": self.choice(), "label": self.label(), "predicted": self.estimate.as_dict()}


@dataclass(slots=True)
class SearchResult:
    plans: list[Plan]
    """Feasible plans, best (fastest) first."""
    considered: int = 0
    pruned: Counter = field(default_factory=Counter)
    """reason → candidates pruned for it."""
    examples: dict[str, str] = field(default_factory=dict)
    """reason → one pruned candidate and the full message."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(base: dict[str, Any], cfg: Any, *, max_microbatches: int = 32,
               space: dict[str, Iterable[Any]] | None = None) -> Iterable[dict[str, Any]]:
    """Knob overlays of every plan in the space (``space`` narrows an axis,
    e.g. {"zero": [0, 3]})."""
    space = space or {}
    world, batch = base["world_size"], base["batch_size"]
    for tp in space.get("tp", [d for d in _divisors(world) if cfg.n_kv_heads % d == 0]):
        for pp in space.get("pp", [d for d in _divisors(world // tp) if cfg.n_layers % d == 0]):
            dp = world // (tp * pp)
            if batch % dp:
                continue
            micro = [m for m in _divisors(batch // dp) if m <= max_microbatches and m & (m - 1) == 0]
            for m, zero, offload, ckpt, sp in itertools.product(
                    space.get("microbatches", micro), space.get("zero", (0, 1, 2, 3)),
                    space.get("offload", ("none", "optimizer", "optimizer+params")),
                    space.get("checkpointing", ("none", "selective", "full")),
                    space.get("sequence_parallel", ("none", "megatron") if tp > 1 else ("none",))):
                yield {**base, "dp": dp, "tp": tp, "pp": pp, "microbatches": m, "zero": zero, "offload": offload,
                       "checkpointing": ckpt, "sequence_parallel": sp, "strategy": base.get("strategy", "manual")}


def search(base: dict[str, Any], profile: MachineProfile, *, memory_budget_bytes: float | None,
           why_not: Callable[[Any], str | None] | None = None, max_microbatches: int = 32,
           space: dict[str, Iterable[Any]] | None = None,
           prepare: Callable[[list[Any]], None] | None = None) -> SearchResult:
    """Every feasible plan for the base cell's model, world size, batch and
    sequence, ranked. ``base`` is a knob mapping (dp/tp/pp/… in it are ignored).
    ``prepare`` sees the feasible plans' knobs before any is timed (the CPU
    planner measures their layer shapes there: ``bench.plan.planner.layer_profiler``);
    memory, which decides feasibility, needs no measurement."""
    from pydantic import ValidationError

    from bench.config.knobs import Knobs
    from bench.plan.memory_model import memory
    from impl.model_config import PRESETS

    cfg = PRESETS[base["model"]]
    base = {k: v for k, v in base.items() if k not in PLAN_KNOBS}
    result = SearchResult(plans=[])
    feasible: list[Any] = []

    def prune(reason: str, overlay: dict[str, Any], message: str) -> None:
        result.pruned[reason] += 1
        if reason not in result.examples:
            shown = " ".join(f"{k}={overlay[k]}" for k in PLAN_KNOBS)
            result.examples[reason] = f"{shown}: {message}"

    for overlay in candidates(base, cfg, max_microbatches=max_microbatches, space=space):
        result.considered += 1
        try:
            knobs = Knobs.model_validate(overlay)
        except ValidationError as exc:
            msg = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            prune("invalid knobs", overlay, msg)
            continue
        why = why_not(knobs) if why_not else None
        if why:
            prune(f"capability: {why.split(':')[0]}", overlay, why)
            continue
        memory_bytes = sum(memory(knobs, cfg))
        if memory_budget_bytes is not None and memory_bytes > memory_budget_bytes:
            prune("over the memory budget", overlay,
                  f"predicted {memory_bytes / 2**30:.2f} GiB > {memory_budget_bytes / 2**30:.2f} GiB")
            continue
        feasible.append(knobs)
    if prepare is not None and feasible:
        prepare(feasible)
    result.plans = [Plan(knobs, estimate(knobs, profile)) for knobs in feasible]
    result.plans.sort(key=lambda p: (p.estimate.step_time_s, p.estimate.memory_bytes))
    return result
