"""The report's figures, each returned as an inline base64 PNG (or None when the
run has nothing to draw). Reads records only: no torch, no adapters."""
from __future__ import annotations

import base64
import io
from typing import Any

import pandas as pd

from bench.analysis.report.labels import cell_label, config_key

IDENTITY_IGNORED = ("adapter",)
SCALING_KNOBS = ("world_size", "seq_len", "microbatches")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """A finished figure as inline base64 PNG (the page needs no network)."""
    import matplotlib.pyplot as plt

    import warnings

    with warnings.catch_warnings():  # crowded multi-axes figures: bbox_inches="tight" below still fits them
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    buf = io.BytesIO()
    # bbox_inches="tight" keeps long titles and legends placed outside the axes in the image.
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _legend_outside(ax) -> None:
    """Legend to the right of the axes: inside, it hid bars (seen in the headless-browser screenshot)."""
    import seaborn as sns

    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False)


def _names(records: list[dict[str, Any]]) -> dict[str, str]:
    """Each cell's name in a figure: adapter and non-default label knobs; where two
    cells share that (they differ in model, batch or sequence), the id's start too."""
    from collections import Counter

    from bench.analysis.report.labels import cell_label

    base = {r["cell_id"]: f"{r['adapter']} {cell_label(r['config'])}" for r in records}
    twice = {n for n, k in Counter(base.values()).items() if k > 1}
    return {i: f"{n} ({i[:6]})" if n in twice else n for i, n in base.items()}


def metric_plot(df: pd.DataFrame, metric: str, title: str, baseline: pd.DataFrame | None = None) -> str | None:
    """One horizontal bar per cell, sized to its rows and its longest label;
    ``baseline`` cells drawn once as dashed reference lines, not as bars."""
    plt = _pyplot()
    import seaborn as sns

    data = df.dropna(subset=[metric]).sort_values(["adapter", "label"])  # one adapter's cells together
    if data.empty:
        return None
    longest = max(len(str(label)) for label in data["label"])
    fig, ax = plt.subplots(figsize=(6 + min(0.075 * longest, 9), max(2.4, 0.4 * data["label"].nunique() + 1.4)))
    sns.barplot(data=data, y="label", x=metric, hue="adapter", dodge=False, ax=ax, orient="h", errorbar=None)
    low, high = f"{metric}_low", f"{metric}_high"
    if low in data and data[low].notna().any():  # launch CIs (repeat > 1), one bar per label in data order
        rows = data.drop_duplicates("label").reset_index(drop=True)
        has = rows[low].notna()
        ax.errorbar(x=rows[metric][has], y=rows.index[has], fmt="none", ecolor="black", capsize=3,
                    xerr=[(rows[metric] - rows[low])[has], (rows[high] - rows[metric])[has]])
        title += " (bars: CI across launches)"
    if baseline is not None:  # the baseline cell of each adapter plotted here, once, as a labelled dashed line
        shown = baseline[baseline.adapter.isin(set(data.adapter))].dropna(subset=[metric])
        for k, (_, b) in enumerate(shown.sort_values(metric).iterrows()):
            ax.axvline(b[metric], linestyle="--", linewidth=1, color="grey")
            ax.text(b[metric], 0.97 - 0.09 * k, f" {b['adapter']} baseline", transform=ax.get_xaxis_transform(),
                    va="top", ha="left", fontsize=7, color="grey")
    ax.set_title(title)
    ax.set_ylabel("")
    _legend_outside(ax)
    return _png(fig)


def step_plot(records: list[dict[str, Any]]) -> str | None:
    """Raw step-time samples per cell, so the spread (the CI) is visible."""
    plt = _pyplot()
    import seaborn as sns

    names = _names(records)
    rows = [{"cell": names[r["cell_id"]], "adapter": r["adapter"], "step_ms": s * 1e3}
            for r in sorted(records, key=lambda r: names[r["cell_id"]]) if r.get("metrics")
            for s in r["metrics"]["step_time_s"]]
    if not rows:
        return None
    data = pd.DataFrame(rows)
    longest = max(len(c) for c in data["cell"])
    fig, ax = plt.subplots(figsize=(6 + min(0.075 * longest, 9), 0.4 * data["cell"].nunique() + 1.2))
    sns.pointplot(data=data, y="cell", x="step_ms", hue="adapter", estimator="median", errorbar=("pi", 80), linestyle="none", ax=ax)
    ax.set_title("step time (median, p10–p90 bars)")
    ax.set_ylabel("")
    _legend_outside(ax)
    return _png(fig)


def launch_strip_plot(records: list[dict[str, Any]]) -> str | None:
    """One dot per launch (its median step time) for every cell launched more than
    once, the cell's median as a bar: a bimodal cell shows two clusters."""
    plt = _pyplot()
    import seaborn as sns

    names = _names(records)
    rows = [{"cell": names[r["cell_id"]] + (" UNSTABLE" if r["metrics"].get("unstable") else ""),
             "adapter": r["adapter"], "launch_ms": launch["median_s"] * 1e3}
            for r in records if r.get("metrics") and len(r["metrics"].get("launches") or []) > 1
            for launch in r["metrics"]["launches"]]
    if not rows:
        return None
    data = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7, 0.45 * data["cell"].nunique() + 1.2))
    sns.stripplot(data=data, y="cell", x="launch_ms", hue="adapter", jitter=0.15, ax=ax)
    sns.pointplot(data=data, y="cell", x="launch_ms", estimator="median", errorbar=None, markers="|", color="black",
                  linestyle="none", ax=ax)
    ax.set_title("step time per launch (dots: launch medians; bar: the cell's median)")
    ax.set_ylabel("")
    _legend_outside(ax)
    return _png(fig)


def busbw_plot(records: list[dict[str, Any]]) -> str | None:
    """busbw against message size for the all-reduce workload (log-log)."""
    plt = _pyplot()
    import seaborn as sns

    rows = [{"message_bytes": r["config"]["message_bytes"], "busbw_gb_per_s": r["metrics"]["busbw_bytes_per_s"] / 1e9,
             "algorithm": r["config"]["allreduce"], "ranks": r["config"]["world_size"]}
            for r in records if r.get("metrics") and r["config"].get("workload") == "allreduce"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=pd.DataFrame(rows), x="message_bytes", y="busbw_gb_per_s", hue="algorithm", style="ranks",
                 markers=True, ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title("all-reduce bus bandwidth (nccl-tests busbw), GB/s")
    return _png(fig)


def _ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] == "ok" and r.get("metrics")]


def loss_parity_plots(records: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """Loss against step for every group of cells that differ only in the adapter
    (same model, data, seed and technique): the frameworks' curves must overlay."""
    import seaborn as sns

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in _ok(records):
        if r["config"].get("workload", "train") == "train" and r["metrics"].get("losses"):
            groups.setdefault(config_key(r["config"], IDENTITY_IGNORED), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["adapter"] for r in v}) > 1}
    if not groups:
        return []
    plt = _pyplot()
    n = len(groups)
    fig, axes = plt.subplots(n, 1, figsize=(7, 2.2 * n + 0.6), squeeze=False)
    for ax, members in zip(axes[:, 0], groups.values()):
        rows = [{"step": i, "loss": l, "adapter": r["adapter"]} for r in members
                for i, l in enumerate(r["metrics"]["losses"]) if l is not None]
        sns.lineplot(data=pd.DataFrame(rows), x="step", y="loss", hue="adapter", style="adapter", markers=True, ax=ax)
        ref = [l for l in members[0]["metrics"]["losses"]]
        worst = max((abs(a - b) / abs(b) for r in members[1:] for a, b in zip(r["metrics"]["losses"], ref)
                     if a is not None and b), default=0.0)
        ax.set_title(f"{cell_label(members[0]['config'], drop=IDENTITY_IGNORED, always=())} — max rel. diff {worst:.1e}", fontsize=9)
        _legend_outside(ax)
    return [("loss parity (same cell, each adapter)", _png(fig))]


def scaling_plots(records: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """tokens/s against ranks, sequence length or micro-batches, for series of
    cells that differ only in that knob."""
    import seaborn as sns

    out = []
    for knob in SCALING_KNOBS:
        series: dict[str, list[dict[str, Any]]] = {}
        for r in _ok(records):
            if r["metrics"].get("tokens_per_s"):
                series.setdefault(config_key(r["config"], (knob,)), []).append(r)
        series = {k: v for k, v in series.items() if len({r["config"][knob] for r in v}) > 1}
        if not series:
            continue
        rows = [{knob: r["config"][knob], "tokens_per_s": r["metrics"]["tokens_per_s"],
                 "series": f"{r['adapter']} {cell_label(r['config'], drop=(knob,), always=())}"} for v in series.values() for r in v]
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        sns.lineplot(data=pd.DataFrame(rows), x=knob, y="tokens_per_s", hue="series", marker="o", ax=ax)
        ax.set_title(f"scaling: tokens/s against {knob}")
        _legend_outside(ax)
        out.append((f"scaling with {knob}", _png(fig)))
    return out


def pipeline_timeline_plots(records: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """Each pipeline cell's last step per rank: forward (light) and backward
    (dark) bars per micro-batch, as the schedule ran them."""
    out = []
    for r in _ok(records):
        by_rank = (r.get("notes") or {}).get("pipeline_by_rank") or {}
        lanes = {int(k): v.get("timeline_last_step") for k, v in by_rank.items() if v.get("timeline_last_step")}
        if not lanes:
            continue
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(lanes) + 1.2))
        for rank, events in sorted(lanes.items()):
            for kind, micro, chunk, start, end in events:
                ax.broken_barh([(start * 1e3, (end - start) * 1e3)], (rank - 0.4, 0.8),
                               facecolors="#9ecae1" if kind == "F" else "#3182bd", edgecolor="white")
                ax.text((start + end) / 2 * 1e3, rank, f"{micro}", ha="center", va="center", fontsize=6)
        ax.set_yticks(sorted(lanes), [f"rank {k}" for k in sorted(lanes)])
        ax.invert_yaxis()
        ax.set_xlabel("ms since the step started (forward light, backward dark; numbers are micro-batches)")
        c = r["config"]
        notes = r.get("notes") or {}
        bubble = (f"; bubble {notes['bubble_measured']:.3f} vs (p−1)/m {notes['bubble_theory']:.3f}"
                  if notes.get("bubble_measured") is not None and notes.get("bubble_theory") else "")
        ax.set_title(f"{r['adapter']} pp={c['pp']} {c['pp_schedule']} m={c['microbatches']} ({r['cell_id']}){bubble}")
        out.append((f"pipeline timeline {r['cell_id']}", _png(fig)))
    return out


def quality_plots(records: list[dict[str, Any]], group_of) -> list[tuple[str, str | None]]:
    """Per technique group (``group_of(record)``), each cell's loss curve (trailing
    mean, metrics.convergence) against tokens beside its reference's (dashed),
    with the source's loss floor and the target: a lossy technique's cost is
    the gap between its curve and the reference's."""
    from bench.analysis.convergence import reference_for

    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {}
    for r in _ok(records):
        conv = r["metrics"].get("convergence")
        ref = reference_for(r, records) if conv else None
        if conv and ref is not r and conv["tokens"] >= 20 * conv["tokens_per_step"]:  # long enough to read
            groups.setdefault(group_of(r), []).append((r, ref))
    out = []
    for group, pairs in sorted(groups.items()):
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(9, 4))
        refs = {ref["cell_id"]: ref for _, ref in pairs if ref is not None}
        for r, style in [*((r, "-") for r, _ in pairs), *((ref, "--") for ref in refs.values())]:
            conv = r["metrics"]["convergence"]
            points = [((i + 1) * conv["tokens_per_step"], v) for i, v in enumerate(conv["curve"]) if v is not None]
            name = cell_label(r["config"], drop=("world_size",), always=("batch_size",))
            ax.plot(*zip(*points), linestyle=style, linewidth=1.4,
                    label=f"{r['adapter']} {name}" + (" (reference)" if style == "--" else ""))
        first = pairs[0][0]["metrics"]["convergence"]
        if first["loss_floor"] is not None:
            ax.axhline(first["loss_floor"], color="black", linestyle=":", linewidth=1, label=f"loss floor {first['loss_floor']:.3f}")
        if first["target_loss"] is not None:
            ax.axhline(first["target_loss"], color="grey", linestyle="-.", linewidth=1, label=f"target {first['target_loss']:g}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss, nats/token (trailing mean)")
        ax.set_title(f"{group}: each cell against its reference (dashed)", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
        out.append((f"loss against tokens — {group}", _png(fig)))
    return out
