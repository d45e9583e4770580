"""`bench explain RESULTS CELL_A CELL_B`: why two cells differ, from their profiles.

Reads records only (the ``metrics.profile`` section written by
``bench.meters.profile``): a side-by-side table of the step-time breakdown,
communication, collectives and memory at the peak, largest differences first,
each with a one-line reading; the knobs that differ; and the two timelines
drawn one above the other (an HTML page with an inline PNG).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.config.knobs import identity

PART_COLORS = {"forward": "#4c72b0", "backward": "#55a868", "optimizer": "#8172b2",
               "exposed_comm": "#c44e52", "idle": "#cccccc"}
_NOUN = {"all_reduce": "all-reduces", "all_gather": "all-gathers", "reduce_scatter": "reduce-scatters",
         "broadcast": "broadcasts", "all_to_all": "all-to-alls", "send": "sends", "recv": "receives",
         "reduce": "reduces", "gather": "gathers", "scatter": "scatters"}


class ExplainError(ValueError):
    """A cell that cannot be explained; the message names what is wrong."""


def label_of(record: dict[str, Any]) -> str:
    from bench.analysis.report.labels import cell_label

    return f"{record['adapter']} {cell_label(record['config'])}"


def find_cell(records: list[dict[str, Any]], ref: str) -> dict[str, Any]:
    """A record by cell id, unique id prefix, or label (``cell_label`` or 'adapter knobs')."""
    exact = [r for r in records if r["cell_id"] == ref]
    hits = exact or [r for r in records if r["cell_id"].startswith(ref)] or [
        r for r in records if ref in (r.get("cell_label"), label_of(r))]
    if not hits:
        known = ", ".join(f"{r['cell_id']} ({label_of(r)})" for r in records)
        raise ExplainError(f"unknown cell {ref!r}; cells in this run: {known}")
    if len({r["cell_id"] for r in hits}) > 1:
        raise ExplainError(f"cell {ref!r} is ambiguous: it matches {', '.join(sorted({r['cell_id'] for r in hits}))}")
    record = hits[-1]
    if record["status"] != "ok":
        raise ExplainError(f"cell {ref!r} ({record['cell_id']}) has status {record['status']!r}: {record.get('reason')}")
    if not (record.get("metrics") or {}).get("profile"):
        raise ExplainError(f"cell {ref!r} ({record['cell_id']}) has no profile: set `profile: true` (or a selector "
                           f"matching it) in the suite and run it again")
    return record


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f} MB"


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def _times(a: float, b: float) -> str:
    if a == 0:
        return "∞×" if b else "1×"
    return f"{b / a:.2g}×" if b / a < 10 else f"{b / a:.0f}×"


def _score(a: float, b: float) -> float:
    """How large a difference is: |log ratio|, with a missing side counted large."""
    if a <= 0 and b <= 0:
        return 0.0
    if a <= 0 or b <= 0:
        return 10.0
    return abs(math.log(b / a))


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {quantity, a, b, ratio, reading, score}, largest difference first."""
    pa, pb = a["metrics"]["profile"], b["metrics"]["profile"]
    rows: list[dict[str, Any]] = []

    def add(quantity: str, va: float, vb: float, fmt, reading: str) -> None:
        rows.append({"quantity": quantity, "a": fmt(va), "b": fmt(vb), "ratio": _times(va, vb), "reading": reading,
                     "score": _score(va, vb)})

    ta, tb = a["metrics"]["step_time_median_s"], b["metrics"]["step_time_median_s"]
    add("step time (timed median)", ta, tb, _ms, f"B's timed step takes {_times(ta, tb)} A's")
    for part in ("forward", "backward", "optimizer", "exposed_comm", "idle"):
        va, vb = pa["breakdown_s"][part], pb["breakdown_s"][part]
        sa, sb = pa["breakdown_share"][part], pb["breakdown_share"][part]
        name = part.replace("_", " ")
        add(f"{name} (profiled step)", va, vb, _ms,
            f"B spends {_times(va, vb)} A's time in {name} ({sb:.0%} of its step vs {sa:.0%})")
    add("communication share", pa["comm_share"], pb["comm_share"], lambda x: f"{x:.0%}",
        f"communication is {pb['comm_share']:.0%} of B's step vs {pa['comm_share']:.0%} of A's "
        f"({_ms(pb['overlapped_comm_s'])} of B's overlapped with compute, A {_ms(pa['overlapped_comm_s'])})")
    for kind in sorted(set(pa["collectives"]) | set(pb["collectives"])):
        ca = pa["collectives"].get(kind, {"calls": 0, "bytes": 0, "mean_bytes": 0.0, "bus_bytes": 0.0})
        cb = pb["collectives"].get(kind, {"calls": 0, "bytes": 0, "mean_bytes": 0.0, "bus_bytes": 0.0})
        noun = _NOUN.get(kind, kind)
        if not ca["calls"]:
            reading = f"B issues {cb['calls']} {noun} ({_mb(cb['mean_bytes'])} each, {_mb(cb['bus_bytes'])} bus); A none"
        elif not cb["calls"]:
            reading = f"A issues {ca['calls']} {noun} ({_mb(ca['mean_bytes'])} each); B none"
        else:
            size = cb["mean_bytes"] / ca["mean_bytes"] if ca["mean_bytes"] else 1.0
            size_txt = f"{1 / size:.2g}× smaller" if size < 1 else f"{size:.2g}× larger"
            reading = f"B issues {_times(ca['calls'], cb['calls'])} as many {noun} of {size_txt} size"
        add(f"{kind} calls", ca["calls"], cb["calls"], lambda x: f"{x:g}", reading)
        add(f"{kind} bus bytes", ca["bus_bytes"], cb["bus_bytes"], _mb,
            f"B moves {_times(ca['bus_bytes'], cb['bus_bytes'])} A's {kind.replace('_', '-')} bus bytes per step")
    ma, mb = pa["memory"], pb["memory"]
    add("peak live memory (profiled step)", ma["peak_bytes"], mb["peak_bytes"], _mb,
        f"B's peak is {_times(ma['peak_bytes'], mb['peak_bytes'])} A's")
    for cat in ("params", "grads", "optimizer", "activations", "buffers"):
        va, vb = ma["at_peak"][cat], mb["at_peak"][cat]
        add(f"{cat} at the peak", va, vb, _mb, f"B's peak holds {_mb(vb)} of {cat} (A {_mb(va)})")
    rows.sort(key=lambda r: -r["score"])
    return rows


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    ia, ib = identity(a["config"]), identity(b["config"])
    keys = sorted(set(ia) | set(ib))
    return [(k, a["config"].get(k), b["config"].get(k)) for k in keys if a["config"].get(k) != b["config"].get(k)]


def timeline_png(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Rank timelines of A above B on one time axis (inline base64 PNG)."""
    from matplotlib.patches import Patch

    from bench.analysis.report.plots import _png, _pyplot

    plt = _pyplot()
    ta, tb = a["metrics"]["profile"]["timelines"], b["metrics"]["profile"]["timelines"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 1.2 + 0.5 * (len(ta) + len(tb))), sharex=True)
    for ax, rec, lines, name in ((axes[0], a, ta, "A"), (axes[1], b, tb, "B")):
        for rank, segs in enumerate(lines):
            for part, color in PART_COLORS.items():
                bars = [(s, e - s) for p, s, e in segs if p == part]
                if bars:
                    ax.broken_barh([(s * 1e3, w * 1e3) for s, w in bars], (rank - 0.4, 0.8), facecolors=color)
        ax.set_yticks(range(len(lines)), [f"rank {r}" for r in range(len(lines))])
        ax.set_title(f"{name}: {label_of(rec)} ({rec['cell_id']})", fontsize=9, loc="left")
    axes[1].set_xlabel("ms since the profiled step began (idle = white)")
    axes[0].legend(handles=[Patch(color=c, label=p.replace("_", " ")) for p, c in PART_COLORS.items() if p != "idle"],
                   loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=8)
    return _png(fig)


def write_page(a: dict[str, Any], b: dict[str, Any], path: Path) -> Path:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("bench.analysis.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    html = env.get_template("explain.html.j2").render(
        a=a, b=b, label_a=label_of(a), label_b=label_of(b), rows=compare(a, b), config=config_diff(a, b),
        timeline=timeline_png(a, b), checks=[(label_of(r), r["metrics"]["profile"]["check"]) for r in (a, b)])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return path


def page_name(a: dict[str, Any], b: dict[str, Any]) -> str:
    return f"explain-{a['cell_id']}-{b['cell_id']}.html"


# --- the run report's pieces ---------------------------------------------------

def _profiled(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] == "ok" and (r.get("metrics") or {}).get("profile")]


def breakdown_plot(records: list[dict[str, Any]]) -> str | None:
    """One stacked bar per profiled cell: forward / backward / optimizer /
    exposed communication / idle of its profiled step (mean over ranks)."""
    cells = _profiled(records)
    if not cells:
        return None
    from bench.analysis.report.plots import _png, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.45 * len(cells)))
    names = [f"{label_of(r)} ({r['cell_id'][:8]})" for r in cells]
    left = [0.0] * len(cells)
    for part, color in PART_COLORS.items():
        widths = [r["metrics"]["profile"]["breakdown_s"][part] * 1e3 for r in cells]
        ax.barh(names, widths, left=left, color=color, label=part.replace("_", " "), edgecolor="#888" if part == "idle" else None)
        left = [a + w for a, w in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("ms in the profiled step (mean over ranks)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return _png(fig)


def explain_pages(records: list[dict[str, Any]], out_dir: Path, group_of) -> list[dict[str, str]]:
    """For each technique group's comparison (its cells beside the baseline
    cells, as the report's plots show them) with two or more profiled cells, the
    explain page of the fastest (A) against the slowest (B) cell."""
    cells_all = _profiled(records)
    names = sorted({group_of(r) for r in cells_all} - {"baseline"}) or ["baseline"]
    groups = {g: [r for r in cells_all if group_of(r) in (g, "baseline")] for g in names}
    links = []
    for group, cells in groups.items():
        if len(cells) < 2:
            continue
        cells.sort(key=lambda r: r["metrics"]["step_time_median_s"])
        best, worst = cells[0], cells[-1]
        page = write_page(best, worst, out_dir / page_name(best, worst))
        links.append({"group": group, "href": page.name, "best": label_of(best), "worst": label_of(worst)})
    return links
