"""Repeated, interleaved launches (`repeat`): the launch is the unit of statistics.
Unit checks of the order and the statistics against their definitions, then a
real run: one record per cell holding every launch, launches of different cells
interleaved, a failing launch ending its cell, and a killed run resuming only
the missing launches."""
from __future__ import annotations

import statistics

import psutil
import pytest
from scipy.stats import binom

from bench.run.launch_stats import aggregate, launch_summary, median_ci, slow_mode_share
from bench.run.schedule import interleaved
from tests.conftest import bench, records, sigkill_runner_when


def test_interleaved_rounds_never_repeat_a_cell_back_to_back():
    cells = ["a", "b", "c"]
    for seed in range(50):
        order = interleaved(cells, 6, str(seed))
        assert [k for _, k in order] == [k for k in range(6) for _ in cells]  # round k holds launch k of every cell
        for r in range(6):
            assert sorted(c for c, k in order if k == r) == cells
        assert all(order[i][0] != order[i + 1][0] for i in range(len(order) - 1)), order
    assert interleaved(cells, 4, "s") == interleaved(cells, 4, "s")
    assert len({tuple(interleaved(cells, 4, str(s))) for s in range(20)}) > 1  # the seed shuffles


def test_median_ci_is_the_binomial_order_statistic_interval():
    xs = [float(x) for x in range(1, 10)]  # n = 9: (x_(2), x_(8)) covers the median with 1 − 2·P(B ≤ 1)
    low, high, coverage = median_ci(xs)
    assert (low, high) == (2.0, 8.0) and coverage == pytest.approx(1 - 2 * binom.cdf(1, 9, 0.5))
    assert coverage == pytest.approx(1 - 2 * 10 / 512)
    low, high, coverage = median_ci([5.0, 1.0, 3.0, 2.0, 4.0])  # n = 5 cannot reach 95 %: (min, max), 93.75 %
    assert (low, high, coverage) == (1.0, 5.0, pytest.approx(0.9375))


def test_slow_mode_and_instability():
    assert slow_mode_share([1.00, 1.01, 0.99, 1.30, 1.31]) == pytest.approx(0.4)
    assert slow_mode_share([1.00, 1.02, 1.04, 1.06, 1.08]) is None
    one = [launch_summary([m] * 3, wall_s=1.0, start_unix=0.0, fixed_cost_s=0.5) for m in (1.0, 1.3, 1.0, 1.3, 1.0)]
    figures = aggregate(one)
    assert figures["step_time_median_s"] == 1.0 and figures["unstable"]
    assert figures["launch_cv"] == pytest.approx(statistics.stdev([1, 1.3, 1, 1.3, 1]) / statistics.fmean([1, 1.3, 1, 1.3, 1]))


SUITE = """
name: repeats
steps: 3
warmup: 1
timeout_s: 120
repeat: 3
defaults: {model: tiny, world_size: 2, batch_size: 4, seq_len: 16}
include:
  - {adapter: inhouse}
  - {adapter: torch}
  - {adapter: inhouse, zero: 2}
  - {adapter: inhouse, fault: raise}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repeats")
    (tmp / "suite.yaml").write_text(SUITE)
    bench("run", str(tmp / "suite.yaml"), "--results", str(tmp / "results"), "--no-progress", check=False)
    return {(r["config"]["adapter"], r["config"]["zero"], r["config"]["fault"]): r for r in records(tmp / "results", "repeats")}


def test_one_record_per_cell_with_every_launch(run):
    assert len(run) == 4
    for key in (("inhouse", 0, "none"), ("torch", 0, "none"), ("inhouse", 2, "none")):
        m = run[key]["metrics"]
        assert run[key]["status"] == "ok" and len(m["launches"]) == 3
        medians = [launch["median_s"] for launch in m["launches"]]
        assert medians == [statistics.median(launch["step_time_s"]) for launch in m["launches"]]
        assert m["step_time_median_s"] == statistics.median(medians)
        assert m["step_time_ci_s"] == [min(medians), max(medians)]
        assert m["launch_findings"] == []  # comm, model state and losses agree across launches
        assert len(m["step_time_s"]) == 3 * 3


def test_launches_of_different_cells_interleave(run):
    starts = sorted((t["launch_start_unix"], r["cell_id"]) for r in run.values()
                    for t in r["timing"].get("launches", [r["timing"]]))
    assert len(starts) == 3 * 3 + 1  # the failing cell launched once
    cells = [c for _, c in starts]
    assert all(cells[i] != cells[i + 1] for i in range(len(cells) - 1)), cells


def test_a_failing_launch_ends_its_cell(run):
    rec = run[("inhouse", 0, "raise")]
    assert rec["status"] == "error" and rec["reason"].startswith("launch 1 of 3: ") and "injected fault" in rec["reason"]


def test_killed_run_resumes_the_missing_launches(tmp_path):
    (tmp_path / "suite.yaml").write_text(SUITE.replace("  - {adapter: inhouse, fault: raise}\n", ""))
    results = tmp_path / "results"
    scratch = results / "repeats" / ".killed"
    family = sigkill_runner_when(tmp_path / "suite.yaml", results, "killed",
                                 lambda: len(list(scratch.glob("*/launch_record.json"))) >= 4)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "orphans after SIGKILL"
    finished = {p.parent.name for p in scratch.glob("*/launch_record.json")}
    assert 4 <= len(finished) < 9, (finished, (tmp_path / "runner-killed.log").read_text()[-3000:])
    out = bench("run", str(tmp_path / "suite.yaml"), "--results", str(results), "--resume", "killed", "--no-progress")
    recs = records(results, "repeats")
    assert len(recs) == 3 and len({r["cell_id"] for r in recs}) == 3
    assert all(r["status"] == "ok" and len(r["metrics"]["launches"]) == 3 for r in recs)
    # the launches finished before the kill were kept, not run again
    kept = {p.parent.name: p.stat().st_mtime for p in scratch.glob("*/launch_record.json")}
    assert finished <= set(kept) and len(kept) == 9
    assert f"over {9 - len(finished)} launches" in out.stdout
