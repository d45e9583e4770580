"""`framework_config: tuned` cells: one record per candidate of the tuning space
(``bench.config.framework_config.tuning_space``); the comparison keeps the best
candidate by launch median (median of launch medians; the step-time median for
a single launch), as the DeepSpeed autotuner keeps its fastest experiment. Every
other record passes through unchanged."""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from bench.analysis.compare import hodges_lehmann_ratio, launch_medians, ratio_ci
from bench.analysis.report.labels import config_key


def best_tuned(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with each tuned cell's candidates reduced to the fastest ok one, which
    carries ``tuning_result``: its candidate, how many ran ok of how many, every candidate's time."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    out: list[dict[str, Any]] = []
    for r in records:
        if r.get("config", {}).get("framework_config") == "tuned":
            groups[config_key(r["config"], ("tuning_candidate",))].append(r)
        else:
            out.append(r)
    for candidates in groups.values():
        ok = [r for r in candidates if r["status"] == "ok" and r.get("metrics")]
        if not ok:
            out += candidates  # nothing to choose from: the failures stay visible
            continue
        times = {r["config"]["tuning_candidate"]: statistics.median(launch_medians(r)) for r in ok}
        best = min(ok, key=lambda r: (times[r["config"]["tuning_candidate"]], r["config"]["tuning_candidate"]))
        space = (best.get("notes") or {}).get("framework_config", {}).get("tuning", {})
        out.append({**best, "tuning_result": {
            "candidate": best["config"]["tuning_candidate"], "ok": len(ok), "tried": len(candidates),
            "of": space.get("of"), "overrides": space.get("overrides"),
            "step_time_s_by_candidate": dict(sorted(times.items())),
            "vs_default": _vs_default(best, ok),
        }})
    return out


def _vs_default(best: dict[str, Any], ok: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best candidate's step time ÷ the default candidate's (candidate 0), with its CI.
    Picking the fastest of k noisy candidates favours a lucky one: a CI that holds 1 means
    the search found nothing better than the defaults."""
    default = next((r for r in ok if r["config"]["tuning_candidate"] == 0), None)
    if default is None or default is best:
        return None
    base, cand = launch_medians(default), launch_medians(best)
    if len(base) < 2 or len(cand) < 2:
        return {"ratio": hodges_lehmann_ratio(base, cand), "ci": None}
    return {"ratio": hodges_lehmann_ratio(base, cand), "ci": list(ratio_ci(base, cand))}
