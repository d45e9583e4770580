"""One self-contained HTML page per run: environment, results table, plots,
measured ÷ theory, failures with reasons. Images are inlined (no network)."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from bench.knobs import Knobs
from bench.results import read_records

DEFAULTS = {name: field.default for name, field in Knobs.model_fields.items()}
LABEL_KNOBS = ("world_size", "tp", "pp", "zero", "offload", "precision", "optimizer", "microbatches", "checkpointing",
               "allreduce", "fusion", "attention", "sequence_parallel", "pp_schedule", "workload", "message_bytes", "fault")
THEORY_TOLERANCE = {"comm_bytes_per_step": 0.01, "model_state_total": 0.05}
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("bench.report", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
)


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in records:
        m, c = r.get("metrics") or {}, r["config"]
        knobs = {k: c[k] for k in ("world_size", "dp", "tp", "pp", "zero", "precision", "optimizer", "microbatches")}
        shown = {k: v for k, v in c.items() if k in LABEL_KNOBS and (k == "world_size" or v != DEFAULTS.get(k))}
        rows.append({
            "cell": r["cell_id"], "adapter": r["adapter"], "status": r["status"], "reason": r.get("reason") or "",
            "label": f"{r['adapter']} " + " ".join(f"{k}={v}" for k, v in shown.items()),
            **knobs,
            "step_time_ms": m.get("step_time_median_s", float("nan")) * 1e3 if m else float("nan"),
            "tokens_per_s": m.get("tokens_per_s") if m else None,
            "mfu_pct": (m["mfu"] * 100) if m and m.get("mfu") is not None else None,
            "peak_mem_mib": (m["peak_mem_bytes"] / 2**20) if m and m.get("peak_mem_bytes") else None,
            "peak_rss_mib": (m["peak_rss_bytes"] / 2**20) if m and m.get("peak_rss_bytes") else None,
            "comm_mib_per_step": (m["comm_bytes_per_step"] / 2**20) if m else None,
            "final_loss": next((l for l in reversed(m.get("losses") or []) if l is not None), None) if m else None,
            "fixed_cost_s": (r.get("timing") or {}).get("fixed_cost_s"),
        })
    return pd.DataFrame(rows)


def _png(fig) -> str:
    """A finished figure as inline base64 PNG (the page needs no network)."""
    import matplotlib.pyplot as plt

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


def _plot(df: pd.DataFrame, metric: str, title: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = df.dropna(subset=[metric])
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(data) + 1.2))
    sns.barplot(data=data, y="label", x=metric, hue="adapter", dodge=False, ax=ax, orient="h")
    ax.set_title(title)
    ax.set_ylabel("")
    _legend_outside(ax)
    return _png(fig)


def _step_plot(records: list[dict[str, Any]]) -> str | None:
    """Raw step-time samples per cell, so the spread (the CI) is visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = [{"cell": f"{r['adapter']} {r['cell_id']}", "adapter": r["adapter"], "step_ms": s * 1e3}
            for r in records if r.get("metrics") for s in r["metrics"]["step_time_s"]]
    if not rows:
        return None
    data = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7, 0.45 * data["cell"].nunique() + 1.2))
    sns.pointplot(data=data, y="cell", x="step_ms", hue="adapter", estimator="median", errorbar=("pi", 80), linestyle="none", ax=ax)
    ax.set_title("step time (median, p10–p90 bars)")
    ax.set_ylabel("")
    _legend_outside(ax)
    return _png(fig)


def _busbw_plot(records: list[dict[str, Any]]) -> str | None:
    """busbw against message size for the all-reduce workload (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def theory_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        for key, ratio in (r.get("theory_ratio") or {}).items():
            if ratio is None:
                continue
            tol = THEORY_TOLERANCE.get(key)
            notes = r.get("notes") or {}
            why = notes.get("comm_vs_theory") if key.startswith("comm") else notes.get("model_state_vs_theory")
            rows.append({"cell": r["cell_id"], "adapter": r["adapter"], "quantity": key, "ratio": ratio,
                         "tolerance": tol, "out_of_tolerance": tol is not None and abs(ratio - 1) > tol,
                         "explained": why or ""})
    return rows


def optimizer_state_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer-state bytes per parameter held on a rank, measured and predicted
    (8-bit Adam ≈ 2, Adam 8, Adafactor O(n+m) per n×m matrix; DESIGN.md)."""
    rows = []
    for r in records:
        m, t, c = r.get("metrics") or {}, r.get("theory") or {}, r["config"]
        measured = (m.get("model_state_bytes") or {}).get("optimizer")
        predicted = (t.get("model_state_bytes") or {}).get("optimizer")
        if r["status"] != "ok" or measured is None or not t.get("params"):
            continue
        local = t["params"] / (c["dp"] if c["zero"] >= 1 else 1)
        rows.append({"cell": r["cell_id"], "adapter": r["adapter"], "optimizer": c["optimizer"],
                     "precision": c["precision"], "zero": c["zero"], "measured_per_param": measured / local,
                     "predicted_per_param": predicted / local if predicted else None,
                     "ratio": measured / predicted if predicted else None})
    return rows


def checkpointing_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each checkpointed cell beside its twin without checkpointing (same knobs
    otherwise): the measured fall in peak memory ÷ the predicted fall in
    activation bytes (``theory.activation_bytes_model``)."""
    def key(c: dict) -> str:
        return json.dumps({k: v for k, v in c.items() if k not in ("checkpointing", "checkpoint_every")}, sort_keys=True)

    ok = [r for r in records if r["status"] == "ok" and (r.get("metrics") or {}).get("peak_mem_bytes")]
    plain = {key(r["config"]): r for r in ok if r["config"]["checkpointing"] == "none"}
    rows = []
    for r in ok:
        twin = plain.get(key(r["config"]))
        if r["config"]["checkpointing"] == "none" or twin is None:
            continue
        measured = twin["metrics"]["peak_mem_bytes"] - r["metrics"]["peak_mem_bytes"]
        t0, t1 = (twin.get("theory") or {}).get("activation_bytes_model"), (r.get("theory") or {}).get("activation_bytes_model")
        predicted = t0 - t1 if t0 is not None and t1 is not None else None
        rows.append({"cell": r["cell_id"], "twin": twin["cell_id"], "adapter": r["adapter"],
                     "mode": f"{r['config']['checkpointing']}" + (f" every {r['config']['checkpoint_every']}"
                                                                   if r["config"]["checkpoint_every"] > 1 else ""),
                     "peak_mib": r["metrics"]["peak_mem_bytes"] / 2**20, "twin_peak_mib": twin["metrics"]["peak_mem_bytes"] / 2**20,
                     "measured_drop_mib": measured / 2**20, "predicted_drop_mib": predicted / 2**20 if predicted else None,
                     "ratio": measured / predicted if predicted else None})
    return rows


def write_report(results_file: Path, out_root: Path) -> Path:
    records = list(read_records(results_file))
    if not records:
        raise ValueError(f"{results_file} holds no records")
    suite, run_id = records[0]["suite"], records[0]["run_id"]
    df = frame(records)
    plots = [(title, img) for title, img in (
        ("step time", _step_plot(records)),
        ("tokens/s", _plot(df, "tokens_per_s", "tokens per second (global)")),
        ("peak memory", _plot(df, "peak_mem_mib", "peak live-tensor / allocated memory, MiB (max over ranks)")),
        ("communication", _plot(df, "comm_mib_per_step", "communication bus MiB per step per rank")),
        ("MFU", _plot(df, "mfu_pct", "MFU %")),
        ("all-reduce busbw", _busbw_plot(records)),
    ) if img]
    columns = ["cell", "label", "status", "step_time_ms", "tokens_per_s", "mfu_pct", "peak_mem_mib", "peak_rss_mib",
               "comm_mib_per_step", "final_loss", "fixed_cost_s"]
    html = _TEMPLATES.get_template("report.html.j2").render(
        suite=suite, run_id=run_id, env=records[0]["env"], table=df[columns].to_dict("records"), columns=columns,
        failures=[r for r in records if r["status"] != "ok"], theory=theory_rows(records), plots=plots,
        optimizer_state=optimizer_state_rows(records), checkpointing=checkpointing_rows(records),
        sources=sorted({(r["metrics"] or {}).get("peak_mem_source") for r in records if r.get("metrics")} - {None}),
        peak_sources=sorted({(r["metrics"] or {}).get("peak_flops_source") for r in records if r.get("metrics")} - {None}),
    )
    out_dir = out_root / suite / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(html)
    return path
