"""The report's derived sections, from records alone: support matrix, loss
parity, scaling and pipeline timelines (golden smoke records, plus copies
varied the way a scaling or pipeline run would vary them)."""
from __future__ import annotations

import copy
import json

import pytest

from bench.analysis.report.build import support_matrix
from bench.analysis.report.plots import loss_parity_plots, pipeline_timeline_plots, scaling_plots
from tests.test_report_and_export import GOLDEN


def _records():
    return [json.loads(line) for line in GOLDEN.read_text().splitlines() if line.strip()]


def test_support_matrix_reads_statuses_and_reasons():
    records = _records()
    refused = copy.deepcopy(records[0])
    refused.update(adapter="colossalai", status="unsupported", metrics=None, techniques=["data_parallel", "zero1"],
                   reason="zero1: not on cpu: LowLevelZeroPlugin: 'AssertionError: device is required'")
    matrix = support_matrix([*records, refused])
    assert matrix["adapters"] == ["colossalai", "inhouse", "torch"]
    rows = {row["technique"]: dict(zip(matrix["adapters"], row["cells"])) for row in matrix["rows"]}
    assert rows["data_parallel"]["inhouse"]["text"] == rows["data_parallel"]["torch"]["text"] == "ok"
    assert rows["zero1"]["colossalai"]["text"] == "unsupported" and "LowLevelZeroPlugin" in rows["zero1"]["colossalai"]["title"]
    assert rows["zero1"]["inhouse"]["text"] == "—"  # not in this run
    del records[0]["techniques"]  # an older record: derived from its config
    assert "data_parallel" in [row["technique"] for row in support_matrix(records[:1])["rows"]]


def test_loss_parity_groups_cells_that_differ_only_in_adapter():
    plots = loss_parity_plots(_records())
    assert len(plots) == 1 and plots[0][1] and len(plots[0][1]) > 1000
    single = [r for r in _records() if r["adapter"] == "inhouse"]
    assert loss_parity_plots(single) == []  # one adapter: nothing to overlay


def test_scaling_plot_needs_a_series_in_one_knob():
    base = next(r for r in _records() if r["status"] == "ok" and r["adapter"] == "inhouse")
    assert scaling_plots([base]) == []
    series = []
    for ws in (1, 2, 4):
        r = copy.deepcopy(base)
        r["config"]["world_size"] = r["config"]["dp"] = ws
        r["metrics"]["tokens_per_s"] *= ws
        series.append(r)
    plots = scaling_plots(series)
    assert [title for title, _ in plots] == ["scaling with world_size"] and plots[0][1]


def test_pipeline_timeline_drawn_from_the_notes():
    r = copy.deepcopy(next(r for r in _records() if r["status"] == "ok"))
    r["config"].update(pp=2, pp_schedule="1f1b", microbatches=2)
    r["notes"]["pipeline_by_rank"] = {
        "0": {"timeline_last_step": [["F", 0, 0, 0.0, 0.002], ["F", 1, 0, 0.002, 0.004], ["B", 0, 0, 0.006, 0.009]]},
        "1": {"timeline_last_step": [["F", 0, 1, 0.002, 0.004], ["B", 0, 1, 0.004, 0.006]]},
    }
    plots = pipeline_timeline_plots([r])
    assert len(plots) == 1 and r["cell_id"] in plots[0][0] and plots[0][1]


def test_adapter_ratios_pair_cells_that_differ_only_in_adapter():
    from bench.analysis.report.adapter_ratios import adapter_ratio_rows

    records = _records()
    rows = adapter_ratio_rows(records)
    pairs = {}
    for r in records:
        if r["status"] == "ok":
            pairs.setdefault(json.dumps({k: v for k, v in r["config"].items() if k not in ("adapter", "dp")},
                                        sort_keys=True), {})[r["adapter"]] = r
    shared = [p for p in pairs.values() if len(p) > 1]
    assert shared and len(rows) == sum(len(p) for p in shared)
    for p in shared:
        ref, other = p["inhouse"]["metrics"], p["torch"]["metrics"]
        label = next(row["cell"] for row in rows if row["adapter"] == "torch"
                     and abs(row["step_time_ms"] - other["step_time_median_s"] * 1e3) < 1e-9)
        mine = {row["adapter"]: row for row in rows if row["cell"] == label}
        assert mine["inhouse"]["is_reference"] and mine["inhouse"]["time_ratio"] == 1.0
        assert mine["torch"]["time_ratio"] == other["step_time_median_s"] / ref["step_time_median_s"]
        assert mine["torch"]["comm_ratio"] == other["comm_bytes_per_step"] / ref["comm_bytes_per_step"]
        assert mine["torch"]["mem_ratio"] == other["peak_mem_bytes"] / ref["peak_mem_bytes"]
    # One adapter only: nothing to compare.
    assert adapter_ratio_rows([r for r in records if r["adapter"] == "inhouse"]) == []


def test_adapter_ratio_carries_its_launch_ci_and_the_strip_plot_shows_launches():
    """With repeated launches the time ratio is the Hodges–Lehmann ratio with its CI;
    a CI holding 1 reads as no significant difference; one dot per launch is drawn."""
    from bench.analysis.report.adapter_ratios import adapter_ratio_rows
    from bench.analysis.report.plots import launch_strip_plot
    from tests.test_compare import _with_launches

    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    inhouse, torch = golden[0], golden[1]  # the same cell under two adapters
    jitter = [1.00, 1.02, 0.98, 1.01, 0.99]
    ref = _with_launches(inhouse, [0.040 * j for j in jitter])
    slower = _with_launches(torch, [0.052 * j for j in reversed(jitter)])
    (row,) = [r for r in adapter_ratio_rows([ref, slower]) if r["adapter"] == "torch"]
    low, high = row["time_ratio_ci"]
    assert row["time_ratio"] == pytest.approx(1.3, rel=0.02) and 1.0 < low <= row["time_ratio"] <= high
    assert row["time_significant"] is True
    same = _with_launches(torch, [0.040 * j for j in reversed(jitter)])
    (row,) = [r for r in adapter_ratio_rows([ref, same]) if r["adapter"] == "torch"]
    assert row["time_ratio_ci"][0] < 1.0 < row["time_ratio_ci"][1] and row["time_significant"] is False
    assert launch_strip_plot([ref, slower]) is not None
    assert launch_strip_plot(golden) is None  # one launch per cell: nothing to strip


def test_sweep_verdict_names_the_best_configuration_and_the_planners_pick():
    """A layout sweep's verdict: best by tokens/s with its lead, leanest, and whether the
    planner's pick (lowest predicted step time) is the measured best — and when it is not."""
    import copy

    from bench.analysis.report.verdict import sweep_verdicts
    from bench.run.results import read_records
    from tests.conftest import ROOT

    recs = list(read_records(ROOT / "tests" / "data" / "sweep-golden.jsonl"))
    (line,) = sweep_verdicts(recs)
    best = max(recs, key=lambda r: r["metrics"]["tokens_per_s"])
    assert f"{best['metrics']['tokens_per_s']:,.0f} tokens/s" in line and "is the measured best" in line
    # plant a planner that prefers the slowest configuration
    worst = min(recs, key=lambda r: r["metrics"]["tokens_per_s"])
    planted = copy.deepcopy(recs)
    for r in planted:
        r["notes"]["plan"]["predicted"]["step_time_s"] = 0.001 if r["cell_id"] == worst["cell_id"] else 1.0
    (line,) = sweep_verdicts(planted)
    ratio = best["metrics"]["tokens_per_s"] / worst["metrics"]["tokens_per_s"]
    assert f"measures {ratio:.2f}× slower than the best" in line
