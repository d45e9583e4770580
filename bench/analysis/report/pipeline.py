"""The report's pipeline section: measured bubble against theory, one row per pipeline cell.

Reads only the record's notes (``bench/adapters/inhouse/pipeline.py`` writes them):
``bubble_measured`` (Σ_r idle ÷ Σ_r busy from the per-stage timelines),
``bubble_theory`` ((p−1)/m, (p−1)/(v·m) interleaved) and
``bubble_stage_theory`` (the same orders replayed at the measured op
durations with free communication). The Gantt charts themselves are
``bench.analysis.report.plots.pipeline_timeline_plots``.
"""
from __future__ import annotations

from typing import Any

BUBBLE_TOLERANCE = 0.10  # the claim: measured ÷ theory within 10 % at m ≥ 4


def pipeline_bubble_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        notes, c = r.get("notes") or {}, r["config"]
        if r["status"] != "ok" or notes.get("bubble_measured") is None:
            continue
        ratio_theory = notes.get("bubble_measured_over_theory")
        ratio_stage = notes.get("bubble_measured_over_stage_theory")
        rows.append({
            "cell": r["cell_id"], "adapter": r["adapter"], "schedule": c["pp_schedule"], "pp": c["pp"],
            "dp": c["dp"], "microbatches": c["microbatches"], "virtual_stages": c.get("virtual_stages", 1),
            "balance": notes.get("pipeline_balance", "params"), "partition": notes.get("pipeline_partition"),
            "oversubscribed": _oversubscribed(r),
            "busy_max_over_mean": notes.get("pipeline_busy_max_over_mean"),
            "measured": notes["bubble_measured"], "theory": notes.get("bubble_theory"),
            "stage_theory": notes.get("bubble_stage_theory"),
            "ratio_theory": ratio_theory, "ratio_stage_theory": ratio_stage,
            "within_theory": ratio_theory is not None and abs(ratio_theory - 1) <= BUBBLE_TOLERANCE,
            "within_stage_theory": ratio_stage is not None and abs(ratio_stage - 1) <= BUBBLE_TOLERANCE,
        })
    return rows


def _oversubscribed(record: dict[str, Any]) -> bool:
    """More ranks on the host than CPU cores: ranks time-share cores, so the timeline holds waits for the CPU."""
    cores = ((record.get("env") or {}).get("cpu_count"))
    c = record["config"]
    return c["device"] == "cpu" and bool(cores) and c["world_size"] > cores
