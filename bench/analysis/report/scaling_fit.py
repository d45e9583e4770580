"""Scaling exponents against sequence length: least squares on log-log.

For every series of ok cells that differ only in ``seq_len`` (at least 3
lengths), fit log(y) = a + b·log(seq_len) for y = median step time and y =
peak memory; b is the exponent (≈ 2 for dense attention's T² term, ≈ 1 for a
fixed window). The fit over all lengths mixes in fixed per-step costs at
short sequences, so the fit over the longest half (≥ 2 points) is shown too:
that is the asymptotic exponent. Sparse series are also set against their
dense twin (same knobs, ``attention: dense``) at the longest common length.
Records only: no torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from bench.analysis.report.labels import cell_label, config_key

MIN_LENGTHS = 3


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Slope of the least-squares line through (log x, log y)."""
    A = np.vstack([np.log(xs), np.ones(len(xs))]).T
    (slope, _), *_ = np.linalg.lstsq(A, np.log(ys), rcond=None)
    return float(slope)


def _series(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        m = r.get("metrics") or {}
        if r["status"] == "ok" and m.get("step_time_median_s") and m.get("peak_mem_bytes"):
            out.setdefault(config_key(r["config"], ("seq_len",)), []).append(r)
    return {k: sorted(v, key=lambda r: r["config"]["seq_len"]) for k, v in out.items()
            if len({r["config"]["seq_len"] for r in v}) >= MIN_LENGTHS}


def _fits(members: list[dict[str, Any]], metric: str) -> tuple[float, float]:
    xs = [r["config"]["seq_len"] for r in members]
    ys = [r["metrics"][metric] for r in members]
    upper = max(2, len(xs) // 2)
    return fit_exponent(xs, ys), fit_exponent(xs[-upper:], ys[-upper:])


def scaling_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per seq_len series: fitted time and memory exponents, and the
    dense ÷ this time and memory ratios at the longest length both have."""
    series = _series(records)
    by_key = {k: {r["config"]["seq_len"]: r for r in v} for k, v in series.items()}
    rows = []
    for key, members in series.items():
        c = members[0]["config"]
        t_all, t_upper = _fits(members, "step_time_median_s")
        m_all, m_upper = _fits(members, "peak_mem_bytes")
        row = {"series": f"{members[0]['adapter']} {cell_label(c, drop=('seq_len',), always=())}".strip(),
               "workload": c.get("workload", "train"), "attention": c.get("attention", "dense"),
               "lengths": [r["config"]["seq_len"] for r in members],
               "time_exponent": t_all, "time_exponent_upper": t_upper,
               "mem_exponent": m_all, "mem_exponent_upper": m_upper,
               "vs_dense_len": None, "dense_time_ratio": None, "dense_mem_ratio": None}
        if row["attention"] != "dense":
            twin = config_key({**c, "attention": "dense", "attention_block": 64, "attention_window": 1}, ("seq_len",))
            dense = by_key.get(twin)
            if dense:
                common = max(set(dense) & {r["config"]["seq_len"] for r in members}, default=None)
                if common:
                    mine = next(r for r in members if r["config"]["seq_len"] == common)
                    row.update(vs_dense_len=common,
                               dense_time_ratio=dense[common]["metrics"]["step_time_median_s"]
                               / mine["metrics"]["step_time_median_s"],
                               dense_mem_ratio=dense[common]["metrics"]["peak_mem_bytes"]
                               / mine["metrics"]["peak_mem_bytes"])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["workload"], r["attention"] != "dense", r["series"]))


def scaling_fit_plot(records: list[dict[str, Any]]) -> str | None:
    """Log-log time and memory against seq_len, one line per series, the fitted
    exponent in the legend."""
    series = _series(records)
    if not series:
        return None
    from bench.analysis.report.plots import _png, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for members in series.values():
        xs = [r["config"]["seq_len"] for r in members]
        c = members[0]["config"]
        name = f"{c.get('workload', 'train')}:{c.get('attention', 'dense')} {members[0]['adapter']}"
        for ax, metric, scale in ((axes[0], "step_time_median_s", 1e3), (axes[1], "peak_mem_bytes", 2**-20)):
            ys = [r["metrics"][metric] * scale for r in members]
            ax.loglog(xs, ys, marker="o", label=f"{name} (b={_fits(members, metric)[1]:.2f})")
    axes[0].set(xlabel="seq_len", ylabel="median step ms", title="time ∝ seq_len^b (b: fit over the longest half)")
    axes[1].set(xlabel="seq_len", ylabel="peak MiB", title="peak memory ∝ seq_len^b")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=7)
    return _png(fig)
