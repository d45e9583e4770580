"""`bench compare BASE CANDIDATE`: a verdict per matched cell, from launches.

Cells are matched by their configuration (test-only knobs such as `fault`
excluded). Step time is judged on the cells' **launch medians** (one figure per
launch, ``metrics.launches``; a record without launches is one launch), never
on pooled steps: the steps of one launch agree closely while launches move
25–30 % on a 2-core VM, so a test on pooled steps asks "same launch?", not
"same code?". The test is an exact one-sided Mann-Whitney U (asv, Google
Benchmark) and the effect the Hodges–Lehmann estimate of the ratio (the median
of every candidate ÷ base launch ratio) with a percentile-bootstrap interval.
Verdicts:

* ``regression`` — candidate slower with p < alpha and a ratio above 1 + threshold;
* ``improvement`` — the same, faster;
* ``same`` — the ratio within ±threshold (significant or not);
* ``inconclusive`` — a ratio past the threshold that the launches cannot confirm
  (measure more launches: Pinpoint adds attempts);
* ``insufficient`` — too few launches for the exact test ever to reach alpha
  (5 per side for alpha = 0.01: the smallest p is 1/C(n+m, n));
* ``failed`` — ok in the base, not in the candidate.

Communication bytes and the CPU live-tensor peak are deterministic per
configuration, so their ratio alone decides. Exit 1 only on a regression or a
failure. No torch import.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config.knobs import identity
from bench.run.results import read_records

TEST_ONLY_KNOBS = ("fault",)
VERDICTS = ("regression", "failed", "improvement", "inconclusive", "insufficient", "same")
BAD = ("regression", "failed")


@dataclass(frozen=True, slots=True)
class Finding:
    key: str
    label: str
    metric: str
    base: float | str | None
    candidate: float | str | None
    ratio: float | None
    p_value: float | None
    verdict: str
    launches: tuple[int, int] | None = None
    """Launches per side (step time)."""
    ratio_ci: tuple[float, float] | None = None
    """95 % percentile-bootstrap interval of the Hodges–Lehmann ratio (step time)."""

    @property
    def regressed(self) -> bool:
        return self.verdict in BAD


def match_key(record: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    config = {k: v for k, v in identity(record["config"]).items() if k not in TEST_ONLY_KNOBS + ignore}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _label(record: dict[str, Any]) -> str:
    c = record["config"]
    return f"{record['adapter']} ws={c['world_size']} zero={c['zero']} {c['precision']} ({record['cell_id']})"


def launch_medians(record: dict[str, Any]) -> list[float]:
    """One figure per launch: the median of its timed steps."""
    launches = record["metrics"].get("launches")
    if launches:
        return [launch["median_s"] for launch in launches]
    return [statistics.median(record["metrics"]["step_time_s"])]


def hodges_lehmann_ratio(base: list[float], cand: list[float]) -> float:
    return statistics.median(c / b for c in cand for b in base)


def ratio_ci(base: list[float], cand: list[float], *, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the Hodges–Lehmann ratio (launches resampled per side)."""
    from scipy.stats import bootstrap

    ci = bootstrap((base, cand), lambda b, c: hodges_lehmann_ratio(list(b), list(c)), vectorized=False,
                   n_resamples=999, method="percentile", rng=seed).confidence_interval
    return float(ci.low), float(ci.high)


def time_verdict(base: list[float], cand: list[float], *, alpha: float, threshold: float,
                 seed: int = 0) -> tuple[str, float, float | None, tuple[float, float] | None]:
    """(verdict, Hodges–Lehmann ratio, p of the tested direction, ratio CI) from launch medians."""
    from scipy.stats import mannwhitneyu

    ratio = hodges_lehmann_ratio(base, cand)
    if 1 / math.comb(len(base) + len(cand), len(base)) >= alpha:
        return "insufficient", ratio, None, None
    slower = float(mannwhitneyu(cand, base, alternative="greater", method="exact").pvalue)
    faster = float(mannwhitneyu(cand, base, alternative="less", method="exact").pvalue)
    interval = ratio_ci(base, cand, seed=seed)
    if slower < alpha and ratio > 1 + threshold:
        return "regression", ratio, slower, interval
    if faster < alpha and ratio < 1 - threshold:
        return "improvement", ratio, faster, interval
    p = min(slower, faster)
    return ("same" if abs(ratio - 1) <= threshold else "inconclusive"), ratio, p, interval


def compare(base_path: Path, cand_path: Path, *, time_threshold: float = 0.05, mem_threshold: float = 0.02,
            alpha: float = 0.01) -> list[Finding]:
    return compare_records(list(read_records(base_path)), list(read_records(cand_path)),
                           time_threshold=time_threshold, mem_threshold=mem_threshold, alpha=alpha)


def split_run(records: list[dict[str, Any]], knob: str, base_value: str,
              cand_value: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A/B inside one run: the cells with ``knob = base_value`` and those with
    ``knob = cand_value`` (values compared as text), matched on every other knob."""
    def side(value: str) -> list[dict[str, Any]]:
        return [r for r in records if str(r["config"].get(knob)).lower() == value.lower()]

    return side(base_value), side(cand_value)


def compare_records(base_records: list[dict[str, Any]], cand_records: list[dict[str, Any]], *,
                    time_threshold: float = 0.05, mem_threshold: float = 0.02, alpha: float = 0.01,
                    ignore: tuple[str, ...] = ()) -> list[Finding]:
    """Verdicts for the cells of both lists that match on their knobs (less ``ignore``)."""
    base = {match_key(r, ignore): r for r in base_records}
    cand = {match_key(r, ignore): r for r in cand_records}
    findings: list[Finding] = []
    for key in sorted(base.keys() & cand.keys()):
        b, c = base[key], cand[key]
        label = _label(c)
        if b["status"] == "ok" and c["status"] != "ok":
            findings.append(Finding(key, label, "status", "ok", f"{c['status']}: {c.get('reason')}", None, None, "failed"))
            continue
        if b["status"] != "ok" or c["status"] != "ok":
            continue
        bm, cm = b["metrics"], c["metrics"]
        bl, cl = launch_medians(b), launch_medians(c)
        verdict, ratio, p, ci = time_verdict(bl, cl, alpha=alpha, threshold=time_threshold)
        findings.append(Finding(key, label, "step_time_s", statistics.median(bl), statistics.median(cl), ratio, p,
                                verdict, (len(bl), len(cl)), ci))
        for metric in ("peak_mem_bytes", "comm_bytes_per_step"):
            bv, cv = bm.get(metric), cm.get(metric)
            if not bv or cv is None:
                continue
            r = cv / bv
            findings.append(Finding(key, label, metric, bv, cv, r, None, "regression" if r > 1 + mem_threshold else
                                    "improvement" if r < 1 - mem_threshold else "same"))
    return findings


def counts(findings: list[Finding]) -> dict[str, int]:
    """Cells per verdict: a cell's verdict is its worst finding's (in ``VERDICTS`` order)."""
    worst: dict[str, str] = {}
    for f in findings:
        if f.key not in worst or VERDICTS.index(f.verdict) < VERDICTS.index(worst[f.key]):
            worst[f.key] = f.verdict
    return {v: sum(1 for w in worst.values() if w == v) for v in VERDICTS}


def headline(findings: list[Finding]) -> str:
    n = counts(findings)
    return (f"**{n['regression']} regression(s)**, {n['failed']} failed, {n['improvement']} improvement(s), "
            f"{n['inconclusive']} inconclusive, {n['insufficient']} insufficient, {n['same']} same "
            f"in {len({f.key for f in findings})} matched cells")


def _order(f: Finding) -> tuple:
    return (VERDICTS.index(f.verdict), -(f.ratio or 0))


def _launches(f: Finding) -> str:
    return f"{f.launches[0]}/{f.launches[1]}" if f.launches else "—"


def _ci(f: Finding) -> str:
    return f"[{f.ratio_ci[0]:.3f}, {f.ratio_ci[1]:.3f}]" if f.ratio_ci else "—"


def markdown(findings: list[Finding]) -> str:
    lines = [headline(findings), "",
             "| cell | metric | verdict | launches (base/cand) | base | candidate | ratio | ratio 95 % CI | p (exact U) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(findings, key=_order):
        verdict = f"**{f.verdict}**" if f.regressed else f.verdict
        lines.append(f"| {f.label} | {f.metric} | {verdict} | {_launches(f)} | {_fmt(f.base)} | {_fmt(f.candidate)} | "
                     f"{_fmt(f.ratio)} | {_ci(f)} | {_fmt(f.p_value)} |")
    return "\n".join(lines) + "\n"


def html_page(findings: list[Finding], base: Path, cand: Path) -> str:
    rows = "".join(
        f"<tr class='{'bad' if f.regressed else ''}'><td>{html.escape(f.label)}</td><td>{f.metric}</td>"
        f"<td>{f.verdict}</td><td>{_launches(f)}</td>"
        f"<td>{html.escape(_fmt(f.base))}</td><td>{html.escape(_fmt(f.candidate))}</td><td>{_fmt(f.ratio)}</td>"
        f"<td>{_ci(f)}</td><td>{_fmt(f.p_value)}</td></tr>"
        for f in sorted(findings, key=_order)
    )
    head = html.escape(headline(findings).replace("**", ""))
    return (f"<!doctype html><meta charset='utf-8'><title>TrainBench compare</title>"
            f"<style>td,th{{border:1px solid #ccc;padding:3px 8px}}.bad{{background:#fdd}}</style>"
            f"<h1>{html.escape(base.name)} → {html.escape(cand.name)}</h1><p>{head}</p>"
            f"<table id='compare-table'><tr><th>cell</th><th>metric</th><th>verdict</th><th>launches</th><th>base</th>"
            f"<th>candidate</th><th>ratio</th><th>ratio CI</th><th>p</th></tr>{rows}</table>{_table_script()}")


def _table_script() -> str:
    """The report pages' inline sorting/filtering script (no network at view time)."""
    from importlib.resources import files

    return (files("bench.analysis.report") / "templates" / "_tables.html.j2").read_text().split("#}\n", 1)[1]


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
