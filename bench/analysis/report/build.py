"""One self-contained HTML page per run: environment, results table, plots,
measured ÷ theory, failures with reasons. Images are inlined (no network)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from bench.analysis.convergence import quality_rows
from bench.analysis.explain import breakdown_plot, explain_pages
from bench.config.knobs import Knobs
from bench.plan.planner import validation as planner_validation
from bench.analysis.report.adapter_ratios import adapter_ratio_rows
from bench.analysis.report.labels import DEFAULTS, cell_label, config_key
from bench.analysis.report.plots import (busbw_plot, loss_parity_plots, metric_plot, pipeline_timeline_plots, scaling_plots,
                                step_plot, launch_strip_plot, quality_plots)
from bench.analysis.report.pipeline import BUBBLE_TOLERANCE, pipeline_bubble_rows
from bench.analysis.report.scaling_fit import scaling_fit_plot, scaling_rows
from bench.analysis.report.guard import Guard
from bench.analysis.report.config_map import config_map_plots
from bench.analysis.report.verdict import LOSS_PARITY_TOL, check_counts, provenance, sweep_verdicts, verdict_rows
from bench.run.results import read_records

THEORY_TOLERANCE = {"comm_bytes_per_step": 0.01, "model_state_total": 0.05}
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("bench.analysis.report", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
)


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in records:
        m, c = r.get("metrics") or {}, r["config"]
        knobs = {k: c[k] for k in ("world_size", "dp", "tp", "pp", "zero", "precision", "optimizer", "microbatches")}
        rows.append({
            "cell": r["cell_id"], "adapter": r["adapter"], "status": r["status"], "reason": r.get("reason") or "",
            "repro": repro(r),
            "label": readable(r),
            **knobs,
            "step_time_ms": m.get("step_time_median_s", float("nan")) * 1e3 if m else float("nan"),
            # launch statistics (repeat > 1): the median of launch medians, its CI across launches, the launch CV
            "launches": len(m.get("launches") or [None]) if m else None,
            "step_time_ci_ms": (f"[{m['step_time_ci_s'][0] * 1e3:.1f}, {m['step_time_ci_s'][1] * 1e3:.1f}]"
                                if m and len(m.get("launches") or []) > 1 else ""),
            "launch_cv_pct": (m["launch_cv"] * 100) if m and m.get("launch_cv") is not None else None,
            "unstable": bool(m.get("unstable")) if m else False,
            # tokens/s at the ends of the step-time CI (tokens per step ÷ each bound), for the plots' error bars
            **_tokens_ci(m),
            "tokens_per_s": m.get("tokens_per_s") if m else None,
            "mfu_pct": (m["mfu"] * 100) if m and m.get("mfu") is not None else None,
            "peak_mem_mib": (m["peak_mem_bytes"] / 2**20) if m and m.get("peak_mem_bytes") else None,
            "peak_rss_mib": (m["peak_rss_bytes"] / 2**20) if m and m.get("peak_rss_bytes") else None,
            "comm_mib_per_step": (m["comm_bytes_per_step"] / 2**20) if m else None,
            "final_loss": next((l for l in reversed(m.get("losses") or []) if l is not None), None) if m else None,
            # fp16: updates skipped on overflow (timed like any step); blank without loss scaling
            "skipped_steps": m.get("skipped_steps") if m else None,
            "fixed_cost_s": (r.get("timing") or {}).get("fixed_cost_s"),
            "group": technique_group(r),
        })
    return pd.DataFrame(rows)


HEADERS = {"cell": "cell", "status": "status", "step_time_ms": "step ms", "launches": "launches",
           "step_time_ci_ms": "step ms 95 % CI", "launch_cv_pct": "launch CV %", "tokens_per_s": "tokens/s",
           "mfu_pct": "MFU %", "peak_mem_mib": "peak MiB", "peak_rss_mib": "RSS MiB",
           "comm_mib_per_step": "comm MiB/step", "final_loss": "final loss", "skipped_steps": "fp16 skipped steps",
           "fixed_cost_s": "fixed cost s"}
"""The results table's headers, with units (the column key is the header's tooltip)."""


def readable(record: dict[str, Any]) -> str:
    """A cell's name on the page: its adapter and non-default knobs ([patched] where TrainBench patched the framework)."""
    patched = " [patched]" if (record.get("notes") or {}).get("patched") else ""
    return f"{record['adapter']} {cell_label(record['config'])}{patched}"


def repro(record: dict[str, Any]) -> str:
    """The command that reruns this cell alone (its suite file as the run named it)."""
    suite_file = (record.get("run") or {}).get("suite_file") or f"<{record['suite']}.yaml>"
    return f"bench run {suite_file} --cell {record['cell_id']}"


def _tokens_ci(m: dict[str, Any]) -> dict[str, float | None]:
    if not m or len(m.get("launches") or []) < 2 or not m.get("tokens_per_s"):
        return {"tokens_per_s_low": None, "tokens_per_s_high": None}
    per_step = m["tokens_per_s"] * m["step_time_median_s"]
    low_s, high_s = m["step_time_ci_s"]
    return {"tokens_per_s_low": per_step / high_s, "tokens_per_s_high": per_step / low_s}


def technique_group(record: dict[str, Any]) -> str:
    """The group a cell is plotted under: its first non-baseline technique's group."""
    from bench.config.techniques import BY_NAME

    groups = [BY_NAME[t].group for t in techniques_of(record) if t in BY_NAME
              and t not in ("data_parallel", "optimizer_adamw")]
    return groups[0] if groups else "baseline"


def techniques_of(record: dict[str, Any]) -> list[str]:
    """The record's techniques (older records: derived from its config)."""
    if record.get("techniques") is not None:
        return record["techniques"]
    from bench.config.techniques import used_by

    try:
        return used_by(Knobs.model_validate({k: v for k, v in record["config"].items() if k in DEFAULTS}))
    except ValueError:
        return []


def support_matrix(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Adapter × technique as this run found it: ok, or the status and reason of
    the cells that used it (from the records alone; no adapter is imported)."""
    adapters = sorted({r["adapter"] for r in records})
    techniques = sorted({t for r in records for t in techniques_of(r)})
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        for t in techniques_of(r):
            entry = cells.setdefault((r["adapter"], t), {"ok": 0, "other": [], "patched": 0})
            if r["status"] == "ok":
                entry["ok"] += 1
                entry["patched"] += bool((r.get("notes") or {}).get("patched"))
            else:
                entry["other"].append(f"{r['status']}: {r.get('reason') or ''}")
    rows = []
    for t in techniques:
        row = {"technique": t, "cells": []}
        for a in adapters:
            e = cells.get((a, t))
            if e is None:
                row["cells"].append({"text": "—", "cls": "", "title": "not in this run"})
            elif e["ok"] and not e["other"]:
                # Patched: the framework ran only after TrainBench monkeypatched it (record notes.patches).
                patched = f" ({e['patched']} patched)" if e["patched"] else ""
                row["cells"].append({"text": "ok (patched)" if e["patched"] else "ok", "cls": "ok",
                                     "title": f"{e['ok']} cell(s) ok{patched}"})
            else:
                text = ("ok* (patched)" if e["patched"] else "ok*") if e["ok"] else e["other"][0].split(":")[0]
                row["cells"].append({"text": text, "cls": "warn", "title": " | ".join(e["other"])[:600]})
        rows.append(row)
    return {"adapters": adapters, "rows": rows}


def theory_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """measured ÷ theory per cell and quantity. Communication rows also carry the
    prediction's source (the paper, section and formula), the measured bytes ÷
    the paper's term alone, and the named terms where the implementation differs
    (``bench.theory.cost``)."""
    rows = []
    for r in records:
        theory = r.get("theory") or {}
        for key, ratio in (r.get("theory_ratio") or {}).items():
            if ratio is None:
                continue
            tol = THEORY_TOLERANCE.get(key)
            notes = r.get("notes") or {}
            why = notes.get("comm_vs_theory") if key.startswith("comm") else notes.get("model_state_vs_theory")
            cost = theory.get("comm_cost") if key.startswith("comm") else theory.get("model_state_cost")
            rows.append({"cell": r["cell_id"], "label": readable(r),
                         "adapter": r["adapter"], "quantity": key, "ratio": ratio,
                         "tolerance": tol, "out_of_tolerance": tol is not None and abs(ratio - 1) > tol,
                         "explained": why or "", **_cost_columns(cost, r.get("metrics") or {}, key)})
    return rows


def _cost_columns(cost: dict | None, metrics: dict[str, Any], key: str) -> dict[str, Any]:
    """The source and named terms of a prediction split by ``bench.theory.cost.Cost``."""
    if not isinstance(cost, dict) or not isinstance(cost.get("source"), str):
        return {"source": "", "terms": [], "vs_paper": None}
    measured = metrics.get("comm_bytes_per_step") if key.startswith("comm") else None
    paper = cost.get("paper_bytes")
    terms = [(name, v) for name, v in (cost.get("terms") or {}).items() if isinstance(v, (int, float))]
    return {"source": cost["source"], "terms": terms,
            "vs_paper": measured / paper if isinstance(measured, (int, float)) and paper else None}


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
        return config_key(c, ("checkpointing", "checkpoint_every"))

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
                                                                   if r["config"].get("checkpoint_every", 1) > 1 else ""),
                     "peak_mib": r["metrics"]["peak_mem_bytes"] / 2**20, "twin_peak_mib": twin["metrics"]["peak_mem_bytes"] / 2**20,
                     "measured_drop_mib": measured / 2**20, "predicted_drop_mib": predicted / 2**20 if predicted else None,
                     "ratio": measured / predicted if predicted else None})
    return rows


def _table(df: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The records' frame and the results table's rows (built once; a record that breaks either is skipped);
    each row also carries the cell's label and repro command (the first column's text and tooltip)."""
    return df, df[[*columns, "label", "repro"]].to_dict("records")


def _distinct(records: list[dict[str, Any]], metric: str) -> list[str]:
    """The different values of one metric across the records (for the page's footnotes)."""
    return sorted({str(m[metric]) for r in records if (m := r.get("metrics") or {}).get(metric)})


def write_report(results_file: Path, out_root: Path) -> Path:
    skipped: list[str] = []
    records = list(read_records(results_file, skipped))
    if not records:
        raise ValueError(f"{results_file} holds no readable records ({len(skipped)} line(s) skipped)")
    suite, run_id = records[0]["suite"], records[0]["run_id"]
    g = Guard(skipped)
    columns = ["cell", "status", "step_time_ms", "launches", "step_time_ci_ms", "launch_cv_pct", "tokens_per_s", "mfu_pct", "peak_mem_mib", "peak_rss_mib",
               "comm_mib_per_step", "final_loss", "skipped_steps", "fixed_cost_s"]
    records, built = g.usable("results table", lambda rs: _table(frame(rs), columns), records)
    if not records:
        raise ValueError(f"{results_file} holds no record the report can read ({len(skipped)} skipped)")
    df, table = built

    def df_plot(what: str, metric: str, group: str):
        try:
            if group == "baseline":
                return metric_plot(df[df.group == "baseline"], metric, f"{what}: baseline cells")
            return metric_plot(df[df.group == group], metric, f"{what}: {group} techniques (dashed: baselines)",
                               baseline=df[df.group == "baseline"])
        except Exception as exc:  # noqa: BLE001 - named on the page, like a skipped record
            skipped.append(f"plot {what} — {group}: not shown: {type(exc).__name__}: {exc}"[:300])
            return None

    single = lambda name, fn: [(name, g.section(name, fn, records))]  # noqa: E731
    several = lambda name, fn: g.section(name, fn, records, empty=[])  # noqa: E731
    plots = [(title, img) for title, img in (
        *single("step time", step_plot),
        *single("step time per launch (repeat > 1)", launch_strip_plot),
        *((f"{what} — {group}", df_plot(what, metric, group))
          for what, metric in (("tokens/s", "tokens_per_s"), ("peak memory MiB", "peak_mem_mib"),
                               ("communication MiB/step", "comm_mib_per_step"), ("MFU %", "mfu_pct"))
          for group in sorted(set(df.group) - {"baseline"}) or ["baseline"]),
        *several("configuration map", config_map_plots),
        *single("all-reduce busbw", busbw_plot),
        *several("quality plots", lambda rs: quality_plots(rs, technique_group)),
        *several("loss parity plots", loss_parity_plots),
        *several("scaling plots", scaling_plots),
        *single("time and peak memory against seq_len (log-log, fitted exponent b)", scaling_fit_plot),
        *several("pipeline timelines", pipeline_timeline_plots),
        *single("step-time breakdown of the profiled step (forward / backward / optimizer / exposed comm / idle)",
                breakdown_plot),
    ) if img]
    sections = {
        "theory": g.section("measured ÷ theory", theory_rows, records, []),
        "optimizer_state": g.section("optimizer state", optimizer_state_rows, records, []),
        "quality": g.section("quality", quality_rows, records, []),
        "checkpointing": g.section("checkpointing", checkpointing_rows, records, []),
        "support": g.section("support matrix", support_matrix, records, {"adapters": [], "rows": []}),
        "scaling": g.section("scaling", scaling_rows, records, []),
        "planner": g.section("planner", planner_validation, records, None),
        "adapter_ratios": g.section("same cell, different framework", adapter_ratio_rows, records, []),
        "pipeline_bubble": g.section("pipeline bubble", pipeline_bubble_rows, records, []),
        "explain_links": g.section("explain pages", lambda rs: explain_pages(rs, out_root / suite / run_id,
                                                                               technique_group), records, []),
    }
    config_maps = [(t, i) for t, i in plots if t.startswith("configuration map")]
    plots = [(t, i) for t, i in plots if not t.startswith("configuration map")]
    verdict = g.section("verdict", lambda rs: verdict_rows(rs, technique_group), records, [])
    counts = check_counts(records, sections["theory"], sections["adapter_ratios"])
    sweep_lines = g.section("sweep verdict", sweep_verdicts, records, [])
    nav = [(i, t) for i, t, shown in (
        ("verdict", "Verdict", True), ("results", "Results", True), ("support", "Support", True),
        ("theory", "Theory", True), ("quality", "Quality", bool(sections["quality"])),
        ("adapter-ratios", "Frameworks", bool(sections["adapter_ratios"])),
        ("config-map", "Configuration map", bool(config_maps)),
        ("planner", "Planner", bool(sections["planner"])),
        ("pipeline-bubble", "Pipeline", bool(sections["pipeline_bubble"])), ("plots", "Plots", True),
        ("failures", "Failures", True)) if shown]
    html = _TEMPLATES.get_template("report.html.j2").render(
        suite=suite, run_id=run_id, env=records[0]["env"], skipped=skipped, table=table,
        provenance=provenance(records), nav=nav, verdict=verdict, counts=counts, parity_tol=LOSS_PARITY_TOL,
        headers=HEADERS, repro=repro, readable=readable, config_maps=config_maps, sweep_lines=sweep_lines,
        columns=columns, failures=[r for r in records if r["status"] != "ok"], plots=plots,
        tolerances=THEORY_TOLERANCE, bubble_tolerance=BUBBLE_TOLERANCE,
        sources=_distinct(records, "peak_mem_source"), peak_sources=_distinct(records, "peak_flops_source"),
        **sections,
    )
    out_dir = out_root / suite / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(html)
    return path
