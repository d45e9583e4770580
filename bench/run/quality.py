"""A training record's quality figures (``metrics.convergence``), computed when
the record is written (docs/convergence.md; the report's comparison with a
reference cell is bench.analysis.convergence).

Every step trains on a batch no step saw before (bench.workloads.train draws
batch s from (seed, s)), and its loss is taken before that step's update: the
per-step loss is a held-out loss of the current weights (progressive
validation: Blum, Kalai & Langford, COLT 1999). Its trailing mean over
``window`` steps is the loss curve; no extra evaluation pass runs, so every
adapter, parallel layout and pipeline schedule is measured the same way.

- ``final_loss``: the curve's last value, at ``tokens`` = steps × global batch tokens;
- ``gap_to_floor``: final_loss − theory.loss_floor (bench.theory.convergence);
- ``steps_to_target``: the first step whose trailing mean is at or below the
  suite's ``quality.target_loss``; ``tokens_to_target`` = steps × batch tokens;
- ``time_to_target_s``: steps_to_target × the cell's median step time, with the
  step-time CI across launches scaled alike (none for one launch; untimed
  warm-up steps count at the median; MLPerf's time-to-train also counts the
  first steps).
"""
from __future__ import annotations

from typing import Any

DEFINITION = ("trailing mean of per-step losses over `window` steps; each step's batch is new, its loss taken "
              "before the update (a held-out loss); time-to-target = steps × median step time")


def trailing_mean(losses: list[float | None], window: int) -> list[float | None]:
    """Mean of the last ``window`` losses at each step (None until a full window,
    or where a loss in it is missing)."""
    out: list[float | None] = []
    for i in range(len(losses)):
        chunk = losses[i + 1 - window:i + 1] if i + 1 >= window else []
        out.append(sum(chunk) / window if chunk and all(v is not None for v in chunk) else None)
    return out


def convergence(record: dict[str, Any], quality: dict[str, Any]) -> dict[str, Any] | None:
    """``metrics.convergence`` of one ok training record; ``quality``: the suite's settings."""
    config, metrics = record["config"], record.get("metrics") or {}
    losses = metrics.get("losses") or []
    if config.get("workload", "train") != "train" or not losses:
        return None
    window = min(quality["window"], len(losses))
    curve = trailing_mean(losses, window)
    tokens_per_step = config["batch_size"] * config["seq_len"]
    floor = (record.get("theory") or {}).get("loss_floor")
    final = curve[-1]
    target = quality.get("target_loss")
    reached = next((i + 1 for i, v in enumerate(curve) if v is not None and v <= target), None) if target else None
    median = metrics.get("step_time_median_s")
    ci = metrics.get("step_time_ci_s") if len(metrics.get("launches") or []) > 1 else None  # across launches only
    return {
        "window": window,
        "tokens_per_step": tokens_per_step,
        "tokens": len(losses) * tokens_per_step,
        "first_loss": next((v for v in curve if v is not None), None),
        "final_loss": final,
        "loss_floor": floor,
        "gap_to_floor": final - floor if final is not None and floor is not None else None,
        "target_loss": target,
        "steps_to_target": reached,
        "tokens_to_target": reached * tokens_per_step if reached else None,
        "time_to_target_s": reached * median if reached and median else None,
        "time_to_target_ci_s": [reached * ci[0], reached * ci[1]] if reached and ci and None not in ci else None,
        "curve": curve,
        "definition": DEFINITION,
    }
