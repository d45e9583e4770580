"""`bench run SUITE --cell ID`: the report's repro command reruns that cell alone;
an unknown id is refused before anything launches, naming it."""
from __future__ import annotations

import yaml

from bench.config.suite import load_suite
from tests.conftest import bench, records

SUITE = {"name": "one-cell", "steps": 2, "warmup": 1,
         "defaults": {"adapter": "inhouse", "model": "tiny", "world_size": 2, "batch_size": 8, "seq_len": 32},
         "matrix": {"zero": [0, 1]}}


def test_run_one_cell_by_id_and_refuse_an_unknown_one(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SUITE))
    _, cells = load_suite(path)
    wanted = cells[1].id
    bad = bench("run", str(path), "--cell", "feedfeedfeed", "--results", str(tmp_path / "r"), check=False)
    assert bad.returncode == 2 and "--cell feedfeedfeed: no such cell" in " ".join(bad.stderr.split())
    assert not (tmp_path / "r" / "one-cell").exists() or not list((tmp_path / "r" / "one-cell").glob("*.jsonl"))
    bench("run", str(path), "--cell", wanted, "--results", str(tmp_path / "r"), "--no-progress")
    (rec,) = records(tmp_path / "r", "one-cell")
    assert rec["cell_id"] == wanted and rec["status"] == "ok" and rec["config"]["zero"] == 1
    assert rec["run"]["suite_file"] == str(path)  # what the report's repro command names
