"""The report's first screen: the run's provenance in one line, then for each
technique group which framework is fastest and which leanest on each cell run
by several, by how much and how sure, and how many theory, loss-parity and
launch checks passed.

"Fastest" compares like with like only: cells that differ in nothing but the
adapter (``same_cell_groups``, as the same-cell table groups them). The ratio is the next adapter's step
time ÷ the fastest's, as a Hodges–Lehmann ratio of launch medians with its 95 %
bootstrap interval when both ran several launches (``bench.analysis.compare``);
an interval that holds 1 reads "no significant difference", and one launch
each reads "one launch: no interval".
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

from bench.analysis.report.adapter_ratios import launch_time_ratio, same_cell_groups
from bench.analysis.report.labels import cell_label

LOSS_PARITY_TOL = 1e-4
"""Relative final-loss difference under which two adapters' runs of one cell agree (fp32 parity is ≤ 1e-5)."""


def provenance(records: list[dict[str, Any]]) -> str:
    """One line: suite, run, commit, host, device, library versions, launches, steps."""
    r = records[0]
    env, run = r.get("env") or {}, r.get("run") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    devices = sorted({x.get("env", {}).get("device_name") or x["config"].get("device", "?") for x in records})
    launches = sorted({len((x.get("metrics") or {}).get("launches") or [None]) for x in records if x.get("metrics")})
    return (f"{r['suite']} / {r['run_id']} · git {env.get('git_sha') or 'unknown'}"
            f"{' (dirty)' if env.get('git_dirty') else ''} · {env.get('host', '?')} · {', '.join(devices)} · "
            f"{versions} · {run.get('warmup', '?')} warm-up + {run.get('steps', '?')} timed steps · "
            f"launches per cell: {', '.join(map(str, launches)) or '—'}")


def verdict_rows(records: list[dict[str, Any]], group_of: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """Per cell run ok under two or more adapters (``same_cell_groups``): the fastest and the leanest."""
    rows = []
    for by_adapter in same_cell_groups(records):
        timed = [r for r in by_adapter.values() if r["metrics"].get("step_time_median_s")]
        if len(timed) < 2:
            continue
        fast, second = sorted(timed, key=lambda r: r["metrics"]["step_time_median_s"])[:2]
        row = {"group": group_of(fast),
               "cell": cell_label(fast["config"], drop=("adapter", "framework_config", "tuning_candidate")),
               "fastest": fast["adapter"], "next": second["adapter"], **_time_ratio(fast, second)}
        mem = sorted((r for r in by_adapter.values() if r["metrics"].get("peak_mem_bytes")),
                     key=lambda r: r["metrics"]["peak_mem_bytes"])
        if len(mem) >= 2:
            row.update(leanest=mem[0]["adapter"],
                       mem_ratio=mem[1]["metrics"]["peak_mem_bytes"] / mem[0]["metrics"]["peak_mem_bytes"],
                       mem_next=mem[1]["adapter"])
        rows.append(row)
    return sorted(rows, key=lambda row: (row["group"], row["cell"]))


def _time_ratio(fast: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    found = launch_time_ratio(fast, second)
    if found is not None:
        ratio, (low, high) = found
        sure = "no significant difference" if low <= 1.0 <= high else "significant"
        return {"ratio": ratio, "ci": (low, high), "sure": sure}
    ratio = second["metrics"]["step_time_median_s"] / fast["metrics"]["step_time_median_s"]
    return {"ratio": ratio, "ci": None, "sure": "one launch: no interval"}


def check_counts(records: list[dict[str, Any]], theory: list[dict[str, Any]],
                 adapter_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Theory checks (within tolerance / explained by the adapter's note / unexplained),
    loss parity between adapters, unstable cells, and non-ok cells by status."""
    statuses: dict[str, int] = defaultdict(int)
    for r in records:
        statuses[r["status"]] += 1
    checked = [t for t in theory if t["tolerance"] is not None]
    parity = [a for a in adapter_rows if not a["is_reference"] and a["loss_rel_diff"] is not None]
    return {
        "cells": len(records), "statuses": dict(sorted(statuses.items())),
        "theory_ok": sum(not t["out_of_tolerance"] for t in checked),
        "theory_explained": sum(t["out_of_tolerance"] and bool(t["explained"]) for t in checked),
        "theory_failed": sum(t["out_of_tolerance"] and not t["explained"] for t in checked),
        "parity_ok": sum(a["loss_rel_diff"] <= LOSS_PARITY_TOL for a in parity),
        "parity_failed": sum(a["loss_rel_diff"] > LOSS_PARITY_TOL for a in parity),
        "unstable": sum(bool((r.get("metrics") or {}).get("unstable")) for r in records),
    }


def sweep_verdicts(records: list[dict[str, Any]]) -> list[str]:
    """One sentence per layout sweep (``config_map.sweeps``): the best configuration by
    tokens/s and its lead over the second, the leanest by peak memory, and whether the
    planner's pick (lowest predicted step time, cells with ``notes.plan``) is the best."""
    from bench.analysis.report.config_map import col_name, row_name, sweeps

    out = []
    for cells in sweeps(records):
        ranked = sorted(cells, key=lambda r: -r["metrics"]["tokens_per_s"])
        best, second = ranked[0], ranked[1]
        name = lambda r: f"{r['adapter']} {row_name(r)} {col_name(r)}"  # noqa: E731 - the map's row and column
        line = (f"{best['config']['model']}, {len(cells)} configurations: best {name(best)} "
                f"({best['metrics']['tokens_per_s']:,.0f} tokens/s, "
                f"{best['metrics']['tokens_per_s'] / second['metrics']['tokens_per_s']:.2f}× the next, {name(second)})")
        lean = min((r for r in cells if r["metrics"].get("peak_mem_bytes")),
                   key=lambda r: r["metrics"]["peak_mem_bytes"], default=None)
        if lean is not None:
            line += f"; leanest {name(lean)} ({lean['metrics']['peak_mem_bytes'] / 2**20:.1f} MiB)"
        planned = [r for r in cells if ((r.get("notes") or {}).get("plan") or {}).get("predicted")]
        if len(planned) >= 2:
            pick = min(planned, key=lambda r: r["notes"]["plan"]["predicted"]["step_time_s"])
            line += (f"; the planner's pick {name(pick)} " + ("is the measured best" if pick is best else
                     f"measures {best['metrics']['tokens_per_s'] / pick['metrics']['tokens_per_s']:.2f}× slower "
                     f"than the best"))
        out.append(line)
    return out
