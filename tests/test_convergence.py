"""The quality axis's arithmetic on records with known curves (bench.analysis.convergence)."""
from __future__ import annotations

import pytest

from bench.analysis.convergence import quality_rows
from bench.run.quality import convergence, trailing_mean
from bench.config.suite import REFERENCE

QUALITY = {"target_loss": 2.0, "window": 2, "reference": REFERENCE}


def record(cell, losses, *, optimizer="adamw", precision="fp32", batch_size=4, step_s=0.5, launches=3,
           ci=(0.4, 0.6), mem=100, status="ok"):
    r = {"cell_id": cell, "adapter": "inhouse", "status": status, "cell_label": cell,
         "config": {"workload": "train", "model": "tiny", "seq_len": 8, "batch_size": batch_size,
                    "optimizer": optimizer, "precision": precision, "attention": "dense", "pp_schedule": "1f1b"},
         "run": {"quality": QUALITY}, "theory": {"loss_floor": 0.25},
         "metrics": {"losses": losses, "step_time_median_s": step_s, "step_time_ci_s": list(ci),
                     "launches": [{"median_s": step_s * (1 + 0.01 * k)} for k in range(launches)],
                     "step_time_s": [step_s] * launches, "peak_mem_bytes": mem, "model_state_bytes": {"optimizer": mem}}}
    r["metrics"]["convergence"] = convergence(r, QUALITY)
    return r


def test_trailing_mean_needs_a_full_window():
    assert trailing_mean([4.0, 2.0, None, 1.0, 3.0], 2) == [None, 3.0, None, None, 2.0]


def test_steps_tokens_and_time_to_target():
    c = record("a", [6.0, 4.0, 3.0, 1.5, 1.0, 1.0])["metrics"]["convergence"]
    # trailing means: -, 5, 3.5, 2.25, 1.25, 1.0 → first ≤ 2.0 at step 5
    assert c["steps_to_target"] == 5 and c["tokens_to_target"] == 5 * 4 * 8
    assert c["time_to_target_s"] == pytest.approx(2.5) and c["time_to_target_ci_s"] == pytest.approx([2.0, 3.0])
    assert c["final_loss"] == 1.0 and c["gap_to_floor"] == pytest.approx(0.75) and c["tokens"] == 6 * 32


def test_one_launch_has_no_time_interval_and_an_unreached_target_no_time():
    assert record("a", [6.0, 4.0, 1.0, 1.0], launches=1)["metrics"]["convergence"]["time_to_target_ci_s"] is None
    c = record("b", [6.0, 5.0, 4.0])["metrics"]["convergence"]
    assert c["steps_to_target"] is None and c["time_to_target_s"] is None and c["final_loss"] == 4.5


def test_gap_to_reference_at_equal_tokens_across_batch_sizes():
    ref = record("ref", [6.0, 4.0, 3.0, 2.0, 2.0, 1.0, 1.0, 1.0], batch_size=4)  # curve: -,5,3.5,2.5,2,1.5,1,1
    big = record("lamb", [6.0, 3.0, 3.0, 3.0], optimizer="lamb", batch_size=8, step_s=0.75, mem=50)  # 4 steps × 64 tokens
    half = record("bf16", [6.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.5, 1.5], precision="bf16", mem=60)
    rows = {r["cell"]: r for r in quality_rows([ref, big, half])}
    assert rows["ref"]["is_reference"] and rows["ref"]["gap_to_reference"] == 0
    # no same-batch reference for lamb: the adamw cell at 256 tokens (its step 8) = 1.0; lamb's final 3.0
    assert rows["lamb"]["reference"] == "ref" and rows["lamb"]["gap_to_reference"] == pytest.approx(2.0)
    assert rows["lamb"]["step_time_vs_reference"] == pytest.approx(1.5) and rows["lamb"]["peak_mem_vs_reference"] == 0.5
    assert rows["bf16"]["gap_to_reference"] == pytest.approx(0.5) and rows["bf16"]["optimizer_state_vs_reference"] == 0.6


def test_interpolates_between_reference_steps():
    ref = record("ref", [4.0, 4.0, 2.0, 2.0], batch_size=4)  # curve by tokens 64: 4, 96: 3, 128: 2
    odd = record("x", [5.0, 3.0, 3.0], optimizer="sgd", batch_size=4)
    odd["metrics"]["convergence"]["tokens"] = 80  # between the reference's steps 2 (64) and 3 (96)
    (row,) = [r for r in quality_rows([ref, odd]) if r["cell"] == "x"]
    assert row["gap_to_reference"] == pytest.approx(3.0 - 3.5)


def test_failed_cells_and_cells_without_a_reference():
    rows = quality_rows([record("f", [6.0, 5.0], status="error"), record("s", [6.0, 5.0], optimizer="sgd")])
    assert [r["cell"] for r in rows] == ["s"] and rows[0]["reference"] is None and rows[0]["gap_to_reference"] is None


def test_pipedream_is_compared_with_1f1b_on_its_own_stages():
    dp = record("dp", [6.0, 4.0, 3.0, 2.0])
    sync = record("1f1b", [6.0, 4.0, 3.0, 2.0])
    stale = record("pipedream", [6.0, 5.0, 4.0, 3.0])
    sync["config"].update(pp=2, microbatches=4, pp_schedule="1f1b")
    stale["config"].update(pp=2, microbatches=4, pp_schedule="pipedream")
    dp["config"].update(pp=1, microbatches=1, pp_schedule="1f1b")
    (row,) = [r for r in quality_rows([dp, sync, stale]) if r["cell"] == "pipedream"]
    assert row["reference"] == "1f1b" and row["gap_to_reference"] == pytest.approx(1.0)


SUITE = """
name: conv
steps: 118
warmup: 2
timeout_s: 120
quality: {target_loss: 5.0, window: 10}
defaults: {model: tiny, world_size: 1, batch_size: 16, seq_len: 32, lr: 0.003}
matrix:
  lr: [0.003, 1.0e-9]
"""


def test_a_run_records_convergence_and_the_report_shows_it(tmp_path):
    """End to end: the cell that trains reaches the target; the one whose
    weights barely move (lr 1e-9) does not, and sits ~ln V above the floor."""
    import json
    import math

    from tests.conftest import bench

    (tmp_path / "s.yaml").write_text(SUITE)
    bench("run", str(tmp_path / "s.yaml"), "--results", str(tmp_path / "r"), "--run-id", "c", "--no-progress")
    recs = {r["config"]["lr"]: r for r in map(json.loads, (tmp_path / "r" / "conv" / "c.jsonl").read_text().splitlines())}
    trains, frozen = recs[0.003]["metrics"]["convergence"], recs[1e-9]["metrics"]["convergence"]
    assert trains["loss_floor"] == pytest.approx(math.log(8) / 32) and trains["tokens"] == 120 * 16 * 32
    assert trains["steps_to_target"] is not None and trains["final_loss"] < 5.0 < frozen["final_loss"]
    assert trains["time_to_target_s"] == pytest.approx(trains["steps_to_target"] * recs[0.003]["metrics"]["step_time_median_s"])
    assert frozen["steps_to_target"] is None and abs(frozen["final_loss"] - math.log(1024)) < 0.05
    bench("report", str(tmp_path / "r" / "conv" / "c.jsonl"), "--out", str(tmp_path / "rep"))
    html = next((tmp_path / "rep").rglob("index.html")).read_text()
    assert "id=\"quality-table\"" in html and "not reached" in html and "(reference)" in html


def test_trade_sentence_names_savings_costs_and_the_loss_gap():
    ref = record("ref", [6.0, 4.0, 3.0, 2.0])
    cheap = record("8bit", [6.0, 4.0, 3.0, 2.5], optimizer="adam8bit", step_s=1.5, mem=25)
    rows = {r["cell"]: r for r in quality_rows([ref, cheap])}
    assert rows["ref"]["trade"] == "reference"
    low, high = rows["8bit"]["step_time_vs_reference_ci"]
    assert low <= 3.0 <= high and high - low < 0.1
    assert rows["8bit"]["trade"] == (f"step time +200 % [{100 * (low - 1):+.0f}, {100 * (high - 1):+.0f}], peak memory -75 %, "
                                     "optimizer state -75 %; loss +0.250 nats at 128 tokens")
    one = record("one", [6.0, 4.0, 3.0, 2.5], optimizer="sgd", step_s=1.0, launches=1)
    (row,) = [r for r in quality_rows([ref, one]) if r["cell"] == "one"]
    assert row["step_time_vs_reference_ci"] is None and row["trade"].startswith("step time +98 % (one launch: no interval); loss")  # 1.0 ÷ median(0.5, 0.505, 0.51)
