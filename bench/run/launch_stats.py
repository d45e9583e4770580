"""Launch-level statistics: the launch, not the step, is the unit.

On the 2-core VMs the same cell's median step time moves 25–30 % from one
launch (a fresh set of rank processes) to the next, while the steps of one
launch agree closely; a statistic over one launch's steps therefore says
nothing about the next launch (STYLE.md rule 13). A cell run ``repeat`` times
gets one figure per launch — the median of its timed steps — and the cell's
figure is the median of those, with an order-statistic confidence interval
across launches (the distribution-free CI of a median: the k-th smallest and
k-th largest of n values cover the median with probability
1 − 2·P(Bin(n, ½) ≤ k − 1)). Its spread is the launch-to-launch coefficient of
variation; pyperf warns when a benchmark's standard deviation passes 10 % of
its mean, and so does ``unstable`` here.
"""
from __future__ import annotations

import statistics
from typing import Any

UNSTABLE_CV = 0.10
"""Launch-to-launch coefficient of variation from which a cell is flagged ``unstable`` (pyperf's warning level)."""
CI_LEVEL = 0.95
DETERMINISTIC = ("comm_bytes_per_step", "comm_bytes_per_step_by_rank", "model_state_bytes", "losses")
"""Per-launch metrics that a configuration fixes: launches that disagree are a finding, never averaged."""


def launch_summary(samples: list[float], *, wall_s: float | None, start_unix: float | None,
                   fixed_cost_s: float | None) -> dict[str, Any]:
    """One launch's figure (the median of its timed steps) and its spread."""
    deciles = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else [samples[0]] * 9
    return {"median_s": statistics.median(samples), "p10_s": deciles[0], "p90_s": deciles[-1], "steps": len(samples),
            "wall_s": wall_s, "start_unix": start_unix, "fixed_cost_s": fixed_cost_s, "step_time_s": list(samples)}


def median_ci(values: list[float], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(low, high, coverage): the order-statistic interval of the median with the
    highest coverage not below ``level``; with too few values, (min, max) and its coverage."""
    from scipy.stats import binom

    xs, n = sorted(values), len(values)
    best = (xs[0], xs[-1], 1 - 2 * binom.cdf(0, n, 0.5))
    for k in range(1, n // 2 + 1):  # k-th smallest and k-th largest (1-based)
        coverage = 1 - 2 * binom.cdf(k - 1, n, 0.5)
        if coverage < level:
            break
        best = (xs[k - 1], xs[n - k], coverage)
    return best


def slow_mode_share(medians: list[float]) -> float | None:
    """Share of launches in the slower of two modes, when the launch medians split
    into two groups whose gap is wider than both groups' spreads together (None: one mode)."""
    xs = sorted(medians)
    if len(xs) < 4:
        return None
    gaps = [(xs[i + 1] - xs[i], i) for i in range(len(xs) - 1)]
    gap, i = max(gaps)
    low, high = xs[: i + 1], xs[i + 1:]
    spread = (low[-1] - low[0]) + (high[-1] - high[0])
    return len(high) / len(xs) if gap > spread and gap > 0.05 * statistics.median(xs) else None


def aggregate(launches: list[dict[str, Any]]) -> dict[str, Any]:
    """The cell's step-time figures from its launches (``launch_summary`` dicts)."""
    medians = [launch["median_s"] for launch in launches]
    low, high, coverage = median_ci(medians)
    mean = statistics.fmean(medians)
    cv = statistics.stdev(medians) / mean if len(medians) > 1 and mean > 0 else None
    return {"step_time_median_s": statistics.median(medians), "step_time_ci_s": [low, high],
            "step_time_ci_level": coverage, "launch_cv": cv, "unstable": cv is not None and cv >= UNSTABLE_CV,
            "slow_mode_share": slow_mode_share(medians)}


def disagreements(per_launch: list[dict[str, Any]]) -> list[str]:
    """Deterministic metrics that differ between launches, as findings."""
    out = []
    for key in DETERMINISTIC:
        values = [m.get(key) for m in per_launch]
        if any(v != values[0] for v in values[1:]):
            out.append(f"{key} differs between launches: " + ", ".join(str(v)[:60] for v in values))
    return out


def merge_launches(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's record from its launches' records (all ``ok``, same cell): the
    first launch's record with ``metrics.launches``, the cell's step-time figures
    from the launch medians (throughput and MFU rescaled to them), every launch's
    samples in ``step_time_s`` (launch after launch), and ``timing.launches``.
    A launch that finished its record but exited badly (a rank killed at the
    timeout after rank 0 wrote the record) keeps its reason, numbered."""
    first = records[0]
    notes = [f"launch {k + 1} of {len(records)}: {r['reason']}" for k, r in enumerate(records) if r.get("reason")]
    launches = [launch_summary(r["metrics"]["step_time_s"], wall_s=r["timing"].get("wall_s"),
                               start_unix=r["timing"].get("launch_start_unix"),
                               fixed_cost_s=r["timing"].get("fixed_cost_s")) for r in records]
    figures = aggregate(launches)
    metrics = dict(first["metrics"])
    scale = metrics["step_time_median_s"] / figures["step_time_median_s"]
    for key in ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu"):
        if metrics.get(key) is not None:
            metrics[key] *= scale
    metrics.update(figures)
    metrics["launches"] = launches
    metrics["step_time_s"] = [s for r in records for s in r["metrics"]["step_time_s"]]
    if len(records) > 1:  # one launch keeps its within-launch step statistics, labelled as such by the count
        low, high = figures["step_time_ci_s"]
        metrics["step_time_stats"] = {**metrics.get("step_time_stats", {}), "median_s": figures["step_time_median_s"],
                                      "ci95_low_s": low, "ci95_high_s": high, "source": "launch medians"}
    metrics["launch_findings"] = disagreements([r["metrics"] for r in records])
    fixed = [launch["fixed_cost_s"] for launch in launches if launch["fixed_cost_s"] is not None]
    timing = {**first["timing"], "launches": [r["timing"] for r in records],
              "wall_s": sum(r["timing"].get("wall_s") or 0.0 for r in records),
              "fixed_cost_s": statistics.median(fixed) if fixed else None}
    return {**first, "reason": "; ".join(notes) or None, "metrics": metrics, "timing": timing}
