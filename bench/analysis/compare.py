"""`bench compare BASE CANDIDATE`: regressions between two runs, asv-style.

Cells are matched by their configuration (test-only knobs such as `fault`
excluded). Step time is compared on the raw samples: a regression needs the
median ratio past the threshold *and* a one-sided Mann-Whitney U test
(candidate slower) significant at `alpha`. Communication bytes are
deterministic per configuration and so is the CPU live-tensor peak (it once
moved by one DDP gradient bucket between launches, 13 % of the tiny model,
while the tracker missed frees made on gloo's worker thread), so the ratio
alone decides. A cell that was ok and no longer is, is a regression too. No
torch import.
"""
from __future__ import annotations

import hashlib
import html
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config.knobs import identity
from bench.run.results import read_records

TEST_ONLY_KNOBS = ("fault",)


@dataclass(frozen=True, slots=True)
class Finding:
    key: str
    label: str
    metric: str
    base: float | str | None
    candidate: float | str | None
    ratio: float | None
    p_value: float | None
    regressed: bool


def match_key(record: dict[str, Any]) -> str:
    config = {k: v for k, v in identity(record["config"]).items() if k not in TEST_ONLY_KNOBS}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _label(record: dict[str, Any]) -> str:
    c = record["config"]
    return f"{record['adapter']} ws={c['world_size']} zero={c['zero']} {c['precision']} ({record['cell_id']})"


def compare(base_path: Path, cand_path: Path, *, time_threshold: float = 0.05, mem_threshold: float = 0.02,
            alpha: float = 0.05) -> list[Finding]:
    from scipy.stats import mannwhitneyu

    base = {match_key(r): r for r in read_records(base_path)}
    cand = {match_key(r): r for r in read_records(cand_path)}
    findings: list[Finding] = []
    for key in sorted(base.keys() & cand.keys()):
        b, c = base[key], cand[key]
        label = _label(c)
        if b["status"] == "ok" and c["status"] != "ok":
            findings.append(Finding(key, label, "status", "ok", f"{c['status']}: {c.get('reason')}", None, None, True))
            continue
        if b["status"] != "ok" or c["status"] != "ok":
            continue
        bm, cm = b["metrics"], c["metrics"]
        bs, cs = bm["step_time_s"], cm["step_time_s"]
        ratio = statistics.median(cs) / statistics.median(bs)
        p = float(mannwhitneyu(cs, bs, alternative="greater").pvalue)
        findings.append(Finding(key, label, "step_time_s", statistics.median(bs), statistics.median(cs), ratio, p,
                                ratio > 1 + time_threshold and p < alpha))
        for metric in ("peak_mem_bytes", "comm_bytes_per_step"):
            bv, cv = bm.get(metric), cm.get(metric)
            if not bv or cv is None:
                continue
            r = cv / bv
            findings.append(Finding(key, label, metric, bv, cv, r, None, r > 1 + mem_threshold))
    return findings


def markdown(findings: list[Finding]) -> str:
    regressed = [f for f in findings if f.regressed]
    lines = [f"**{len(regressed)} regression(s)** in {len({f.key for f in findings})} matched cells", "",
             "| cell | metric | base | candidate | ratio | p (Mann-Whitney U) | regressed |",
             "|---|---|---|---|---|---|---|"]
    for f in sorted(findings, key=lambda f: (not f.regressed, -(f.ratio or 0))):
        lines.append(f"| {f.label} | {f.metric} | {_fmt(f.base)} | {_fmt(f.candidate)} | {_fmt(f.ratio)} | "
                     f"{_fmt(f.p_value)} | {'**yes**' if f.regressed else 'no'} |")
    return "\n".join(lines) + "\n"


def html_page(findings: list[Finding], base: Path, cand: Path) -> str:
    rows = "".join(
        f"<tr class='{'bad' if f.regressed else ''}'><td>{html.escape(f.label)}</td><td>{f.metric}</td>"
        f"<td>{html.escape(_fmt(f.base))}</td><td>{html.escape(_fmt(f.candidate))}</td><td>{_fmt(f.ratio)}</td>"
        f"<td>{_fmt(f.p_value)}</td><td>{'yes' if f.regressed else 'no'}</td></tr>"
        for f in sorted(findings, key=lambda f: (not f.regressed, -(f.ratio or 0)))
    )
    return (f"<!doctype html><meta charset='utf-8'><title>TrainBench compare</title>"
            f"<style>td,th{{border:1px solid #ccc;padding:3px 8px}}.bad{{background:#fdd}}</style>"
            f"<h1>{html.escape(base.name)} → {html.escape(cand.name)}</h1>"
            f"<table><tr><th>cell</th><th>metric</th><th>base</th><th>candidate</th><th>ratio</th><th>p</th>"
            f"<th>regressed</th></tr>{rows}</table>")


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
