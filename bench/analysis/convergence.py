"""The quality axis in the report: each cell against its reference cell. The
record's own figures (``metrics.convergence``: loss curve, final loss, gap to
the floor, steps-, tokens- and time-to-target) are defined and computed in
bench.run.quality when the record is written.

- ``gap_to_reference`` (``quality_rows``): final_loss − the reference cell's
  curve at the same token count (linear between its steps), the reference
  being the suite's ``quality.reference`` knob values, same model and seq_len
  (``reference_for``);
- step time, peak memory, optimizer state and communication as cell ÷ reference,
  the step time as a Hodges–Lehmann ratio of launch medians with its interval;
- ``trade``: those in one sentence.
"""
from __future__ import annotations

from typing import Any


def _at_tokens(conv: dict[str, Any], tokens: float) -> float | None:
    """The cell's curve at ``tokens`` (linear between steps; None outside it)."""
    per = conv["tokens_per_step"]
    points = [((i + 1) * per, v) for i, v in enumerate(conv["curve"]) if v is not None]
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= tokens <= t1:
            return v0 + (v1 - v0) * (tokens - t0) / (t1 - t0)
    return points[-1][1] if points and points[-1][0] == tokens else None


def reference_for(record: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The suite's reference cell for ``record``: its ``quality.reference`` knob
    values, the same model and seq_len; of those, the same batch size where one
    exists, then the one sharing most knob values (PipeDream's reference is the
    1F1B cell of its pipeline layout, not a data-parallel cell)."""
    wanted = ((record.get("run") or {}).get("quality") or {}).get("reference") or {}
    c = record["config"]
    pool = [r for r in records if r["status"] == "ok" and (r.get("metrics") or {}).get("convergence")
            and all(r["config"].get(k) == v for k, v in wanted.items())
            and r["config"]["model"] == c["model"] and r["config"]["seq_len"] == c["seq_len"]]
    if not pool:
        return None
    return max(pool, key=lambda r: (r["config"]["batch_size"] == c["batch_size"],
                                    sum(r["config"].get(k) == v for k, v in c.items())))


def quality_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ok training cell: loss against floor, target and reference,
    and the speed and memory it traded for it (cell ÷ reference)."""
    from bench.analysis.report.labels import cell_label  # the report package imports this module

    rows = []
    for r in records:
        conv = (r.get("metrics") or {}).get("convergence")
        if r["status"] != "ok" or not conv:
            continue
        ref = reference_for(r, records)
        ref_conv = ref["metrics"]["convergence"] if ref else None
        at_ref = _at_tokens(ref_conv, conv["tokens"]) if ref_conv else None
        m, rm = r["metrics"], (ref or {}).get("metrics") or {}
        rows.append({
            "cell": r["cell_id"], "adapter": r["adapter"], "label": cell_label(r["config"], always=("world_size", "batch_size")),
            "is_reference": ref is r, "reference": ref["cell_id"] if ref else None,
            "tokens": conv["tokens"], "final_loss": conv["final_loss"], "loss_floor": conv["loss_floor"],
            "gap_to_floor": conv["gap_to_floor"],
            "gap_to_reference": conv["final_loss"] - at_ref if at_ref is not None and conv["final_loss"] is not None else None,
            "target_loss": conv["target_loss"], "tokens_to_target": conv["tokens_to_target"],
            "time_to_target_s": conv["time_to_target_s"], "time_to_target_ci_s": conv["time_to_target_ci_s"],
            **_time_ratio(r, ref),
            "peak_mem_vs_reference": _ratio(m.get("peak_mem_bytes"), rm.get("peak_mem_bytes")),
            "optimizer_state_vs_reference": _ratio((m.get("model_state_bytes") or {}).get("optimizer"),
                                                   (rm.get("model_state_bytes") or {}).get("optimizer")),
            "comm_vs_reference": _ratio(m.get("comm_bytes_per_step"), rm.get("comm_bytes_per_step")),
        })
    for row in rows:
        row["trade"] = trade(row)
    return rows


def trade(row: dict[str, Any]) -> str:
    """One sentence: what the cell saves or costs against its reference, and the
    loss it pays for it ("optimizer state −75 %, step time +204 %; loss +0.015 at
    204,800 tokens")."""
    if row["is_reference"] or row["reference"] is None:
        return "reference" if row["is_reference"] else "no reference"
    parts = [f"{what} {100 * (v - 1):+.0f} %" for what, v in (
        ("step time", row["step_time_vs_reference"]), ("peak memory", row["peak_mem_vs_reference"]),
        ("optimizer state", row["optimizer_state_vs_reference"]), ("communication", row["comm_vs_reference"]))
        if v is not None and abs(v - 1) >= 0.005]
    ci = row["step_time_vs_reference_ci"]
    if parts and parts[0].startswith("step time"):
        parts[0] += (f" [{100 * (ci[0] - 1):+.0f}, {100 * (ci[1] - 1):+.0f}]" if ci else " (one launch: no interval)")
    gap = row["gap_to_reference"]
    loss = f"loss {gap:+.3f} nats at {row['tokens']:,} tokens" if gap is not None else "loss not comparable (tokens beyond the reference's)"
    return ", ".join(parts or ["no speed or memory change"]) + "; " + loss


def _time_ratio(record: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """Step time ÷ the reference's: the Hodges–Lehmann ratio of launch medians,
    with its 95 % bootstrap interval where both ran more than one launch."""
    from bench.analysis.compare import hodges_lehmann_ratio, launch_medians, ratio_ci

    if ref is None or not record["metrics"].get("step_time_s") or not ref["metrics"].get("step_time_s"):
        return {"step_time_vs_reference": None, "step_time_vs_reference_ci": None}
    mine, theirs = launch_medians(record), launch_medians(ref)
    both = record is not ref and len(mine) > 1 and len(theirs) > 1
    return {"step_time_vs_reference": hodges_lehmann_ratio(theirs, mine),
            "step_time_vs_reference_ci": ratio_ci(theirs, mine) if both else None}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
