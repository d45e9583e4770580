"""The planner's choice against DeepSpeed's autotuner (bench/plan/autotune_compare.py).

Per commit: the reader of the autotuner's results folder, on the files one real
run wrote (tests/data/autotune_results/, trimmed to what is read), and the
config handed to the autotuner. The comparison itself launches 13 DeepSpeed
runs (~10 min on 2 cores) and compares timings, so it is `calibration`
(nightly, quiet machine)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.plan.autotune_compare import autotuner_config, base_cell, compare, format_table, read_results, space

DATA = Path(__file__).parent / "data" / "autotune_results"
BASE = base_cell("small", 2, 8, 128)


def test_reads_every_experiment_and_the_choice(tmp_path) -> None:
    results = tmp_path / "autotuning_results"
    shutil.copytree(DATA, results)
    exps, chosen = read_results(results)
    assert {(e.zero, e.microbatches) for e in exps} == {(z, m) for z in range(4) for m in (1, 2, 4)}
    for e in exps:
        assert e.micro_batch_size * e.microbatches == 4  # one global batch: 2 ranks × 4
        assert e.throughput > 0 and e.latency_s > 0
    assert chosen.throughput == max(e.throughput for e in exps)  # it keeps the highest throughput
    (results / "ds_config_optimal.json").unlink()
    with pytest.raises(ValueError, match="ds_config_optimal.json missing"):
        read_results(results)


def test_autotuner_searches_the_planners_space() -> None:
    cfg = autotuner_config(BASE)
    assert cfg["zero_optimization"] == {"stage": [0, 1, 2, 3]}
    # micro-batch size b ↔ accumulation steps 4 / b at global batch 8 on 2 ranks
    assert sorted(4 // b for b in cfg["train_micro_batch_size_per_gpu"]) == space(BASE)["microbatches"] == [1, 2, 4]
    assert "train_batch_size" not in cfg and cfg["optimizer"]["params"]["torch_adam"]  # same optimizer as the adapter


@pytest.mark.calibration
def test_planner_and_autotuner_picks_are_both_measured(tmp_path) -> None:
    result = compare(tmp_path, BASE)
    print(format_table(result))
    assert len(result["autotuner_experiments"]) == 12
    for label in ("planner", "autotuner"):
        pick = result["picks"][label]
        assert pick["status"] == "ok", pick["reason"]
        assert pick["harness_step_s"] > 0 and pick["autotuner_samples_per_s"] > 0
