"""The configuration map: when a run sweeps the layout (dp/tp/pp/cp, micro-batches,
ZeRO) of one model and batch, heat maps of tokens/s and of peak memory over the
sweep, the best configuration boxed, the planner's predicted step time beside
the measured one where the cell carries a plan (``notes.plan``), as the
Ultra-Scale Playbook draws its DP×TP×PP × micro-batch maps."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from bench.analysis.report.labels import config_key

LAYOUT = ("dp", "tp", "pp", "cp")
COLUMNS = ("microbatches", "zero", "pp_schedule", "sequence_parallel", "checkpointing")
SWEPT = LAYOUT + COLUMNS + ("world_size", "virtual_stages", "tp_mode", "strategy")
MIN_CELLS = 4


def sweeps(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Groups of ok training cells equal in everything but the swept knobs, with
    at least MIN_CELLS cells and two layouts or two column values."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        m = r.get("metrics") or {}
        if r["status"] == "ok" and m.get("tokens_per_s") and r["config"].get("workload", "train") == "train":
            groups[config_key(r["config"], SWEPT)].append(r)
    out = []
    for cells in groups.values():
        rows, cols = {row_name(r) for r in cells}, {col_name(r) for r in cells}
        if len(cells) >= MIN_CELLS and (len(rows) > 1 or len(cols) > 1):
            out.append(cells)
    return out


def row_name(r: dict[str, Any]) -> str:
    c = r["config"]
    row = " ".join(f"{k}{c.get(k, 1)}" for k in LAYOUT if k != "cp" or c.get(k, 1) > 1)  # older records: no cp
    row += f" {c['tp_mode']}" if c.get("tp_mode", "1d") != "1d" else ""
    return row + (f" {c.get('pp_schedule', '1f1b')}" if c.get("pp", 1) > 1 else "")


def col_name(r: dict[str, Any]) -> str:
    c = r["config"]
    parts = [f"m{c.get('microbatches', 1)}", f"z{c.get('zero', 0)}"]
    parts += [str(c[k]) for k in ("sequence_parallel", "checkpointing") if c.get(k) not in (None, "none")]
    return " ".join(parts)


def config_map_plots(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, png) per sweep and metric: tokens/s (higher is better) and peak memory."""
    from bench.analysis.report.plots import _png, _pyplot

    out = []
    for cells in sweeps(records):
        model = cells[0]["config"]["model"]
        for metric, what, best in (("tokens_per_s", "tokens/s", max), ("peak_mem_bytes", "peak MiB", min)):
            values = {(row_name(r), col_name(r)): r for r in cells if r["metrics"].get(metric)}
            if len(values) < MIN_CELLS:
                continue
            rows = sorted({k[0] for k in values})
            cols = sorted({k[1] for k in values})
            plt = _pyplot()
            import numpy as np
            import seaborn as sns

            scale = 2.0**-20 if metric == "peak_mem_bytes" else 1.0
            grid = np.full((len(rows), len(cols)), np.nan)
            notes = np.full((len(rows), len(cols)), "", dtype=object)
            for (rk, ck), r in values.items():
                i, j = rows.index(rk), cols.index(ck)
                grid[i, j] = r["metrics"][metric] * scale
                notes[i, j] = f"{grid[i, j]:,.0f}"
                plan = ((r.get("notes") or {}).get("plan") or {}).get("predicted")
                if metric == "tokens_per_s" and plan and plan.get("step_time_s"):
                    measured_ms = r["metrics"]["step_time_median_s"] * 1e3
                    notes[i, j] += f"\n{measured_ms:.0f} ms (plan {plan['step_time_s'] * 1e3:.0f})"
            fig, ax = plt.subplots(figsize=(1.8 + 1.9 * len(cols), 1.2 + 0.75 * len(rows)))
            sns.heatmap(grid, annot=notes, fmt="", cmap="viridis" if best is max else "viridis_r", ax=ax,
                        xticklabels=cols, yticklabels=rows, cbar_kws={"label": what}, annot_kws={"fontsize": 8})
            target = best(values.items(), key=lambda kv: kv[1]["metrics"][metric])[0]
            ax.add_patch(plt.Rectangle((cols.index(target[1]), rows.index(target[0])), 1, 1, fill=False,
                                       edgecolor="red", linewidth=3))
            ax.set_title(f"configuration map: {what} over the sweep ({model}, best boxed)")
            ax.set_xlabel("micro-batches, ZeRO stage, …")
            ax.set_ylabel("layout")
            out.append((f"configuration map — {what} ({model}; {len(values)} configurations, best boxed)",
                        _png(fig)))
    return out
