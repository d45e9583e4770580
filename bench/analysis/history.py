"""`bench history RESULTS_DIR`: per-cell, per-metric trends across runs, with
step detection, as one self-contained HTML page. No torch import.

Runs are ordered by their records' ``env.start_time`` (then run id); cells are
matched across runs as `bench compare` matches them (``match_key``: the
resolved knobs, test-only knobs excluded). Each (cell, metric) series holds
one value per run: the median step time (raw samples kept for the test
below), tokens/s, peak memory and communication bytes per step.

Step detection, per series of run values v_1..v_n:

1. **Where.** The split t that minimises the L1 cost of a two-level fit,
   Σ_{i<t} |v_i − med(v_<t)| + Σ_{i≥t} |v_i − med(v_≥t)| — the piecewise-
   constant L1 fit asv's step detection solves, here one step at a time
   (binary segmentation: after a step is accepted, each side is searched
   again). Each side must hold at least ``MIN_RUNS`` (2) runs: one launch
   cannot tell a step from a one-off slow launch (whole launches on shared
   CPUs shift by up to ~40 %), so a change in the newest run becomes a step
   once the next run confirms it — `bench compare` judges a single run.
2. **Whether.** A candidate is a step only if all of:
   * the relative change med(after)/med(before) − 1 is at least the
     metric's threshold (5 % for time and throughput, 2 % for memory and
     communication: `bench compare`'s defaults);
   * the change is beyond the run-to-run noise: |Δ| ≥ 3 · SE(Δ), where
     SE(Δ) = 1.2533 · σ̂ · √(1/n_before + 1/n_after) is the standard error of
     a difference of two medians of n runs (1.2533 = √(π/2), the median's
     inefficiency), and σ̂ is the robust difference-based estimate 1.4826 · median_i |v_{i+1} − v_i| / √2 over the
     whole series (as in wild binary segmentation, Fryzlewicz 2014): steps
     touch only a few successive differences, so they barely move it, while
     residuals around a segment median would count a second, not yet found
     step as noise. Samples within one launch understate noise (on shared
     CPUs whole launches shift), so noise is judged between runs;
   * for step time and tokens/s (per-step tokens ÷ step time), a two-sided
     Mann–Whitney U test on the runs' launch medians (runs with ``repeat`` > 1;
     a one-launch run contributes its steps) before vs after is significant at alpha ÷ (number of splits tried)
     (Bonferroni: the split was chosen as the best of those tried).
   The table says how many runs support each side.
"""
from __future__ import annotations

import base64
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.analysis.compare import match_key
from bench.run.results import read_records

# metric -> (record field, axis label, scale to the plotted unit, change threshold)
METRICS: dict[str, tuple[str, str, float, float]] = {
    "step_time_s": ("step_time_median_s", "step time median, ms", 1e3, 0.05),
    "tokens_per_s": ("tokens_per_s", "tokens/s (global)", 1.0, 0.05),
    "peak_mem_bytes": ("peak_mem_bytes", "peak memory, MiB", 2.0**-20, 0.02),
    "comm_bytes_per_step": ("comm_bytes_per_step", "communication bus MiB per step per rank", 2.0**-20, 0.02),
}
NOISE_SIGMAS = 3.0
MIN_RUNS = 2  # per side of a step


@dataclass(frozen=True, slots=True)
class Run:
    suite: str
    run_id: str
    start_time: str
    git_sha: str | None
    git_dirty: bool | None

    @property
    def name(self) -> str:
        sha = (self.git_sha or "unknown")[:8] + ("+" if self.git_dirty else "")
        return f"{self.start_time[:16].replace('T', ' ')} {sha}"


@dataclass(slots=True)
class Series:
    suite: str
    key: str
    label: str
    metric: str
    runs: list[int] = field(default_factory=list)  # indices into the run list, ascending
    values: list[float] = field(default_factory=list)
    samples: list[list[float] | None] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Step:
    suite: str
    key: str
    label: str
    metric: str
    run: int  # index of the first run at the new level
    previous_run: int  # the last run at the old level (bisect between the two shas)
    before: float
    after: float
    change: float  # after / before − 1
    p_value: float | None
    runs_before: int
    runs_after: int


def load_runs(results_dir: Path) -> tuple[list[Run], list[dict[str, Any]]]:
    """Every run file in RESULTS_DIR (a suite folder) or one level below it (a
    results root); committed baselines are copies of runs and are left out."""
    files = sorted(results_dir.glob("*.jsonl")) + sorted(
        f for f in results_dir.glob("*/*.jsonl") if f.parent.name != "baselines")
    if not files:
        raise FileNotFoundError(f"no run files (*.jsonl) in {results_dir} or its suite folders")
    records = [r for f in files for r in read_records(f)]
    runs: dict[tuple[str, str], Run] = {}
    for r in records:
        env = r.get("env") or {}
        ident = (r["suite"], r["run_id"])
        start = env.get("start_time") or ""
        if ident not in runs or (start and start < runs[ident].start_time):
            runs[ident] = Run(r["suite"], r["run_id"], start, env.get("git_sha"), env.get("git_dirty"))
    ordered = sorted(runs.values(), key=lambda run: (run.start_time, run.run_id))
    return ordered, records


def build_series(runs: list[Run], records: list[dict[str, Any]]) -> list[Series]:
    from bench.analysis.report.labels import cell_label

    index = {(run.suite, run.run_id): i for i, run in enumerate(runs)}
    latest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in records:  # a resumed run may hold a cell twice: the later record wins
        if r["status"] == "ok" and r.get("metrics"):
            latest[(r["suite"], match_key(r), index[(r["suite"], r["run_id"])])] = r
    series: dict[tuple[str, str, str], Series] = {}
    for (suite, key, run), r in sorted(latest.items(), key=lambda kv: kv[0][2]):
        c, m = r["config"], r["metrics"]
        label = f"{r['adapter']} {cell_label(c, drop=('fault',))}"
        for metric, (name, *_rest) in METRICS.items():
            value = m.get(name)
            if value is None:
                continue
            s = series.setdefault((suite, key, metric), Series(suite, key, label, metric))
            s.runs.append(run)
            s.values.append(float(value))
            s.samples.append(_samples(metric, m))
    return list(series.values())


def _samples(metric: str, m: dict[str, Any]) -> list[float] | None:
    """The run's samples where the metric has them: its launch medians when it
    launched cells more than once (the launch is the unit: never pooled steps),
    else its one launch's step times; tokens/s is tokens per step ÷ each of them."""
    launches = m.get("launches") or []
    raw = [launch["median_s"] for launch in launches] if len(launches) > 1 else m.get("step_time_s")
    if not raw or metric not in ("step_time_s", "tokens_per_s"):
        return None
    if metric == "step_time_s":
        return list(raw)
    tokens_per_step = m["tokens_per_s"] * m["step_time_median_s"]
    return [tokens_per_step / x for x in raw if x > 0]


def _l1(values: list[float]) -> float:
    med = statistics.median(values)
    return sum(abs(v - med) for v in values)


def noise_sigma(values: list[float]) -> float:
    """Run-to-run standard deviation, robust to steps: MAD of successive differences ÷ √2."""
    diffs = [abs(b - a) for a, b in zip(values, values[1:])]
    return 1.4826 * statistics.median(diffs) / math.sqrt(2) if diffs else 0.0


def _accept(s: Series, lo: int, t: int, hi: int, *, threshold: float, sigma: float, alpha: float,
            tried: int) -> Step | None:
    before, after = s.values[lo:t], s.values[t:hi]
    mb, ma = statistics.median(before), statistics.median(after)
    if mb == 0:
        return None
    change = ma / mb - 1
    if abs(change) < threshold:
        return None
    if abs(ma - mb) < NOISE_SIGMAS * math.sqrt(math.pi / 2) * sigma * math.sqrt(1 / len(before) + 1 / len(after)):
        return None
    p = None
    pooled_b = [x for xs in s.samples[lo:t] if xs for x in xs]
    pooled_a = [x for xs in s.samples[t:hi] if xs for x in xs]
    if pooled_b and pooled_a:
        from scipy.stats import mannwhitneyu

        p = float(mannwhitneyu(pooled_a, pooled_b, alternative="two-sided").pvalue)
        if p >= alpha / tried:
            return None
    return Step(s.suite, s.key, s.label, s.metric, s.runs[t], s.runs[t - 1], mb, ma, change, p, t - lo, hi - t)


def detect_steps(s: Series, *, thresholds: dict[str, float] | None = None, alpha: float = 0.05) -> list[Step]:
    """Steps of one series (binary segmentation; see the module docstring)."""
    threshold = (thresholds or {}).get(s.metric, METRICS[s.metric][3])
    sigma = noise_sigma(s.values)
    steps: list[Step] = []
    todo = [(0, len(s.values))]
    while todo:
        lo, hi = todo.pop()
        splits = range(lo + MIN_RUNS, hi - MIN_RUNS + 1)
        if not splits:
            continue
        t = min(splits, key=lambda t: (_l1(s.values[lo:t]) + _l1(s.values[t:hi]), -t))
        step = _accept(s, lo, t, hi, threshold=threshold, sigma=sigma, alpha=alpha, tried=len(splits))
        if step is not None:
            steps.append(step)
            todo += [(lo, t), (t, hi)]
    return sorted(steps, key=lambda st: st.run)


def _plot(metric: str, series: list[Series], steps: list[Step], runs: list[Run]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    _name, ylabel, scale, _threshold = METRICS[metric]
    fig, ax = plt.subplots(figsize=(9, 4))
    palette = sns.color_palette("tab10", len(series))
    for i, (color, s) in enumerate(zip(palette, series)):
        ys = [v * scale for v in s.values]
        dodge = 0.04 * (i - (len(series) - 1) / 2) if metric == "step_time_s" else 0.0  # error bars apart
        xs = [r + dodge for r in s.runs]
        ax.plot(xs, ys, marker="o", markersize=4, color=color, label=f"{s.suite}: {s.label}")
        if metric == "step_time_s":  # p10-p90 of each run's raw samples
            q = [statistics.quantiles(x, n=10) if x and len(x) > 1 else None for x in s.samples]
            low = [y - qq[0] * scale if qq else 0 for y, qq in zip(ys, q)]
            high = [qq[-1] * scale - y if qq else 0 for y, qq in zip(ys, q)]
            ax.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.6)
        for st in steps:
            if (st.suite, st.key, st.metric) == (s.suite, s.key, s.metric):
                ax.axvline(st.run - 0.5, color=color, linestyle="--", linewidth=1)
    ax.set_xticks(range(len(runs)), [f"#{i}\n{r.start_time[5:10]}\n{(r.git_sha or '?')[:7]}" for i, r in enumerate(runs)],
                  fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per run" + (" (bars: p10–p90 of the run's samples)" if metric == "step_time_s" else "")
                 + "; dashed: detected step")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def history(results_dir: Path, *, thresholds: dict[str, float] | None = None,
            alpha: float = 0.05) -> tuple[list[Run], list[Series], list[Step]]:
    runs, records = load_runs(results_dir)
    series = build_series(runs, records)
    steps = [st for s in series for st in detect_steps(s, thresholds=thresholds, alpha=alpha)]
    return runs, series, steps


def write_history(results_dir: Path, out: Path, *, thresholds: dict[str, float] | None = None,
                  alpha: float = 0.05) -> tuple[Path, list[Run], list[Step]]:
    from bench.analysis.report.build import _TEMPLATES

    runs, series, steps = history(results_dir, thresholds=thresholds, alpha=alpha)
    plots = [(METRICS[m][1], _plot(m, [s for s in series if s.metric == m], steps, runs))
             for m in METRICS if any(s.metric == m for s in series)]
    rows = [{"cell": f"{st.suite}: {st.label}", "key": st.key, "metric": st.metric,
             "run": runs[st.run], "previous": runs[st.previous_run],
             "before": _fmt(st.before * METRICS[st.metric][2]), "after": _fmt(st.after * METRICS[st.metric][2]),
             "unit": METRICS[st.metric][1], "change_pct": 100 * st.change,
             "p_value": "—" if st.p_value is None else f"{st.p_value:.2g}",
             "support": f"{st.runs_before} → {st.runs_after}"} for st in steps]
    page = _TEMPLATES.get_template("history.html.j2").render(
        source=str(results_dir), runs=runs, cells=len({(s.suite, s.key) for s in series}), plots=plots, steps=rows,
        thresholds={m: (thresholds or {}).get(m, METRICS[m][3]) for m in METRICS}, alpha=alpha, sigmas=NOISE_SIGMAS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out, runs, steps


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}" if math.isfinite(v) else "—"
