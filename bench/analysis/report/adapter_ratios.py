"""The report's "same cell, different framework" table: for every configuration
that ran ok under two or more adapters, each adapter's step time, peak memory
and communication per step beside the reference adapter's, as ratios.

The reference is the in-house adapter when it ran the cell (TrainBench's own
implementation, checked against theory), else the first adapter in name
order. Ratios come from one run, measured the same way for every adapter, so
they are the comparable figures; absolute times on a shared CPU are not. With
repeated launches the time ratio is the Hodges–Lehmann ratio of the launch
medians with its bootstrap CI, and a CI that holds 1 reads "no significant
difference" (``bench.analysis.compare``).
The final-loss difference is relative to the reference's final loss.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from bench.analysis.compare import hodges_lehmann_ratio, launch_medians, ratio_ci
from bench.analysis.report.labels import cell_label, config_key
from bench.analysis.tuning import best_tuned

REFERENCE_ADAPTER = "inhouse"


def same_cell_groups(records: list[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    """Adapter → ok record, for each configuration run ok under two or more adapters.
    Cells differ in framework_config too, so a `theory` cell is never grouped with a
    `default` one; `tuned` cells enter as their best candidate."""
    groups: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in best_tuned(records):
        if r["status"] == "ok" and r.get("metrics"):
            groups[config_key(r["config"], ("adapter", "tuning_candidate"))].setdefault(r["adapter"], r)
    return [by_adapter for by_adapter in groups.values() if len(by_adapter) >= 2]


def launch_time_ratio(base: dict[str, Any], cand: dict[str, Any]) -> tuple[float, tuple[float, float]] | None:
    """cand ÷ base step time as the Hodges–Lehmann ratio of launch medians with its
    bootstrap CI, where both cells ran more than one launch (else None)."""
    a, b = launch_medians(base), launch_medians(cand)
    if len(a) < 2 or len(b) < 2:
        return None
    return hodges_lehmann_ratio(a, b), ratio_ci(a, b)


def adapter_ratio_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for by_adapter in same_cell_groups(records):
        ref_name = REFERENCE_ADAPTER if REFERENCE_ADAPTER in by_adapter else min(by_adapter)
        ref = by_adapter[ref_name]
        label = cell_label(ref["config"], drop=("adapter", "framework_config", "tuning_candidate"))
        for name in sorted(by_adapter, key=lambda a: (a != ref_name, a)):
            rows.append(_row(label, name, ref_name, by_adapter[name]["metrics"], ref["metrics"])
                        | _time_ci(by_adapter[name], ref) | _config(by_adapter[name]))
    return sorted(rows, key=lambda row: row["cell"])


def _row(label: str, adapter: str, reference: str, m: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    def ratio(key: str) -> float | None:
        a, b = m.get(key), ref.get(key)
        return a / b if a is not None and b else None

    loss, ref_loss = _final_loss(m), _final_loss(ref)
    return {
        "cell": label, "adapter": adapter, "reference": reference, "is_reference": adapter == reference,
        "step_time_ms": m["step_time_median_s"] * 1e3 if m.get("step_time_median_s") is not None else None,
        "time_ratio": ratio("step_time_median_s"),
        "peak_mem_mib": m["peak_mem_bytes"] / 2**20 if m.get("peak_mem_bytes") else None,
        "mem_ratio": ratio("peak_mem_bytes"),
        "comm_mib": m["comm_bytes_per_step"] / 2**20 if m.get("comm_bytes_per_step") is not None else None,
        "comm_ratio": ratio("comm_bytes_per_step"),
        "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss) if loss is not None and ref_loss else None,
    }


def _config(record: dict[str, Any]) -> dict[str, Any]:
    """The configuration mode shown beside the ratio, and the settings that differ from the framework's defaults."""
    fc = (record.get("notes") or {}).get("framework_config") or {}
    mode = record["config"].get("framework_config", "default")
    tuned = record.get("tuning_result")
    if tuned:
        mode += f" (candidate {tuned['candidate']}, best of {tuned['ok']}"
        gain = tuned.get("vs_default")
        if gain and gain["ci"]:
            low, high = gain["ci"]
            mode += f"; ÷ default {gain['ratio']:.2f} [{low:.2f}, {high:.2f}]" + (
                ", not better than default" if low <= 1.0 <= high else "")
        mode += ")"
    return {"framework_config": mode,
            "non_default": [f"{s['setting']}={s['value']}" for s in fc.get("non_default", [])]}


def _final_loss(metrics: dict[str, Any]) -> float | None:
    return next((v for v in reversed(metrics.get("losses") or []) if v is not None), None)


def _time_ci(record: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """The time ratio from launch medians, with its CI, where both cells ran more than one launch."""
    found = None if record is ref else launch_time_ratio(ref, record)
    if found is None:
        return {"time_ratio_ci": None, "time_significant": None}
    ratio, (low, high) = found
    return {"time_ratio": ratio, "time_ratio_ci": (low, high), "time_significant": not low <= 1.0 <= high}
