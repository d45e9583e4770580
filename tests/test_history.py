"""`bench history`: trends across runs and step detection, on synthetic runs
made from the golden records (raw samples rescaled per run, plus noise)."""
from __future__ import annotations

import copy
import json
import random
import statistics

import subprocess

import pytest

from bench.analysis.compare import match_key
from bench.analysis.history import build_series, detect_steps, history, load_runs, noise_sigma
from tests.conftest import bench
from tests.test_report_and_export import GOLDEN

BASE = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
KEYS = [match_key(r) for r in BASE]


def write_runs(folder, n_runs: int, *, seed: int, time_factor=lambda cell, run: 1.0,
               mem_factor=lambda cell, run: 1.0, run_noise: float = 0.02, sample_noise: float = 0.03):
    """`n_runs` run files of the golden cells. Each (cell, run) launch gets its
    own level shift (N(0, run_noise)), each sample N(0, sample_noise) more.
    File names are random so that only env.start_time can order the runs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    run_ids = []
    for run in range(n_runs):
        run_id = f"{rng.getrandbits(32):08x}"
        run_ids.append(run_id)
        lines = []
        for cell, base in enumerate(BASE):
            r = copy.deepcopy(base)
            r["run_id"] = run_id
            r["env"].update(start_time=f"2026-11-{run + 1:02d}T03:00:00Z", git_sha=f"{run:02d}" * 20, git_dirty=False)
            level = time_factor(cell, run) * (1 + rng.gauss(0, run_noise))
            m = r["metrics"]
            m["step_time_s"] = [s * level * (1 + rng.gauss(0, sample_noise)) for s in m["step_time_s"]]
            m["step_time_median_s"] = statistics.median(m["step_time_s"])
            m["tokens_per_s"] = r["config"]["batch_size"] * r["config"]["seq_len"] / m["step_time_median_s"]
            m["peak_mem_bytes"] = int(m["peak_mem_bytes"] * mem_factor(cell, run))
            lines.append(json.dumps(r))
        (folder / f"{run_id}.jsonl").write_text("\n".join(lines) + "\n")
    return run_ids


@pytest.mark.parametrize("seed", range(5))
def test_a_30pct_step_is_found_at_the_run_it_happened(tmp_path, seed):
    run_ids = write_runs(tmp_path / "smoke", 6, seed=seed, time_factor=lambda cell, run: 1.3 if cell == 0 and run >= 3 else 1.0)
    runs, _series, steps = history(tmp_path / "smoke")
    assert [r.run_id for r in runs] == run_ids  # ordered by start_time, not by file name
    by_metric = {(st.key, st.metric): st for st in steps}
    assert set(by_metric) == {(KEYS[0], "step_time_s"), (KEYS[0], "tokens_per_s")}, steps
    slow = by_metric[(KEYS[0], "step_time_s")]
    assert runs[slow.run].run_id == run_ids[3] and runs[slow.previous_run].run_id == run_ids[2]
    assert 0.2 < slow.change < 0.4 and slow.p_value < 1e-6
    assert (slow.runs_before, slow.runs_after) == (3, 3)
    assert -0.3 < by_metric[(KEYS[0], "tokens_per_s")].change < -0.15


@pytest.mark.parametrize("seed", range(10))
def test_flat_series_flag_nothing(tmp_path, seed):
    write_runs(tmp_path / "smoke", 6, seed=seed)
    assert history(tmp_path / "smoke")[2] == []


def test_one_slow_launch_in_the_middle_is_not_a_step(tmp_path):
    # Whole launches on a shared 2-core VM sometimes run ~40 % slower (tests/test_compare.py).
    write_runs(tmp_path / "smoke", 7, seed=1, time_factor=lambda cell, run: 1.4 if run == 3 else 1.0)
    assert history(tmp_path / "smoke")[2] == []


def test_a_change_in_the_newest_run_is_a_step_once_the_next_run_confirms_it(tmp_path):
    slow_from = lambda first: (lambda cell, run: 1.3 if cell == 0 and run >= first else 1.0)  # noqa: E731
    write_runs(tmp_path / "one", 6, seed=4, time_factor=slow_from(5))
    assert history(tmp_path / "one")[2] == []  # one slow launch: could be the machine
    run_ids = write_runs(tmp_path / "two", 6, seed=4, time_factor=slow_from(4))
    runs, _series, steps = history(tmp_path / "two")
    assert {(st.key, st.metric, runs[st.run].run_id) for st in steps} == {
        (KEYS[0], "step_time_s", run_ids[4]), (KEYS[0], "tokens_per_s", run_ids[4])}


def test_memory_step_and_a_revert_are_both_found(tmp_path):
    run_ids = write_runs(tmp_path / "smoke", 10, seed=2,
                         time_factor=lambda cell, run: 1.3 if cell == 1 and 3 <= run < 7 else 1.0,
                         mem_factor=lambda cell, run: 1.1 if cell == 2 and run >= 2 else 1.0)
    runs, _series, steps = history(tmp_path / "smoke")
    found = sorted((st.key, st.metric, runs[st.run].run_id, round(st.change, 1)) for st in steps if st.metric != "tokens_per_s")
    assert found == sorted([(KEYS[1], "step_time_s", run_ids[3], 0.3), (KEYS[1], "step_time_s", run_ids[7], -0.2),
                            (KEYS[2], "peak_mem_bytes", run_ids[2], 0.1)]), steps
    (mem,) = [st for st in steps if st.metric == "peak_mem_bytes"]
    assert mem.p_value is None  # deterministic metric: ratio and run-to-run noise decide


def test_a_step_needs_the_change_past_the_threshold(tmp_path):
    write_runs(tmp_path / "smoke", 6, seed=3, mem_factor=lambda cell, run: 1.015 if cell == 0 and run >= 3 else 1.0)
    runs, records = load_runs(tmp_path / "smoke")
    (s,) = [s for s in build_series(runs, records) if s.key == KEYS[0] and s.metric == "peak_mem_bytes"]
    assert detect_steps(s) == []  # +1.5 %: under the 2 % default, though noise-free
    (st,) = detect_steps(s, thresholds={"peak_mem_bytes": 0.01})
    assert st.run == 3 and abs(st.change - 0.015) < 1e-3


def test_noise_sigma_ignores_steps():
    flat = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]
    stepped = flat[:3] + [v + 0.5 for v in flat[3:]]
    assert 0.005 < noise_sigma(flat) < 0.03
    assert noise_sigma(stepped) < 2 * noise_sigma(flat)  # one jump among five differences


def test_cli_writes_a_self_contained_page(tmp_path):
    run_ids = write_runs(tmp_path / "results" / "smoke", 6, seed=0,
                         time_factor=lambda cell, run: 1.3 if cell == 0 and run >= 3 else 1.0)
    (tmp_path / "results" / "baselines").mkdir()
    (tmp_path / "results" / "baselines" / "smoke.jsonl").write_text(GOLDEN.read_text())  # not a run: ignored
    out = bench("history", str(tmp_path / "results"), "--out", str(tmp_path / "reports")).stdout
    page = (tmp_path / "reports" / "results" / "history.html").read_text()
    assert "2 step(s)" in out and f"step_time_s +" in out and run_ids[3] in out
    assert page.count("data:image/png;base64,") == 4  # step time, tokens/s, memory, comm
    assert "http://" not in page and "https://" not in page
    assert 'id="steps-table"' in page and KEYS[0] in page and run_ids[3] in page and "03" * 20 in page
    assert page.count("<tr>") == 1 + 2 + 1 + 6  # steps header + 2 steps, runs header + 6 runs (golden run excluded)


def test_cli_on_a_folder_without_runs_fails_cleanly(tmp_path):
    proc = bench("history", str(tmp_path), check=False)
    assert proc.returncode == 2 and "no run files" in proc.stderr


# --- the nightly workflow (.github/workflows/nightly.yml) -------------------------------------------

WORKFLOW = GOLDEN.parents[2] / ".github" / "workflows" / "nightly.yml"


def _workflow() -> dict:
    import yaml

    return yaml.safe_load(WORKFLOW.read_text())


def _step(name_part: str) -> dict:
    (step,) = [s for s in _workflow()["jobs"]["gpu"]["steps"] if name_part in s.get("name", "")]
    return step


def test_nightly_workflow_parses_and_runs_the_regression_chain():
    wf = _workflow()
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert "schedule" in triggers and "workflow_dispatch" in triggers
    job = wf["jobs"]["gpu"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    assert "make setup" in runs and "bench run" in runs and "bench report" in runs and "bench compare" in runs
    assert "--benchmark-compare-fail=median:10%" in runs and "suites/smoke.yaml" in runs
    (upload,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload["if"] == "${{ always() }}" and "reports/" in upload["with"]["path"]
    assert job["steps"][0]["uses"].startswith("actions/checkout")
    assert list(GOLDEN.parents[1].glob("test_*_benchmark.py")), "the micro-benchmark glob matches nothing"


def test_nightly_workflow_shell_steps_are_valid_bash():
    import re

    steps = [s for s in _workflow()["jobs"]["gpu"]["steps"] if "run" in s]
    assert len(steps) == 8
    assert any("pytest -m calibration" in s["run"] for s in steps)  # the planner's measured validation
    (fuzz,) = [s for s in steps if "test_fuzz" in s["run"]]  # the fuzz tests at the nightly budget
    assert fuzz["env"]["TRAINBENCH_FUZZ"] == "nightly"
    for step in steps:
        script = re.sub(r"\$\{\{[^}]*\}\}", "x", step["run"])
        proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert proc.returncode == 0, (step["name"], proc.stderr)


def _run_compare_step(tmp_path, candidate_lines: list[str], base: list[str]) -> subprocess.CompletedProcess:
    """The workflow's compare step, as written, in a scratch checkout holding the golden run as baseline."""
    import os
    import re

    from tests.conftest import ROOT

    (tmp_path / "results" / "baselines").mkdir(parents=True)
    (tmp_path / "results" / "smoke").mkdir()
    (tmp_path / "results" / "baselines" / "smoke.jsonl").write_text("\n".join(base) + "\n")
    (tmp_path / "results" / "smoke" / "cand.jsonl").write_text("\n".join(candidate_lines) + "\n")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    script = re.sub(r"\$\{\{ steps\.suite\.outputs\.name \}\}", "smoke", _step("Compare")["run"])
    env = {**os.environ, "RUN_ID": "cand", "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_nightly_compare_step_passes_a_a_and_fails_a_regression(tmp_path):
    """The step as written, on records of 10 launches each (the nightly protocol):
    launch medians jittered ±2 % pass; the first cell 30 % slower fails it."""
    from tests.test_compare import _with_launches

    jitter = [1.00, 1.01, 0.99, 1.02, 0.98, 1.005, 0.995, 1.015, 0.985, 1.0]
    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    base = [_with_launches(r, [r["metrics"]["step_time_median_s"] * j for j in jitter]) for r in golden]
    same = [_with_launches(r, [r["metrics"]["step_time_median_s"] * j for j in reversed(jitter)]) for r in golden]
    slow = [_with_launches(golden[0], [golden[0]["metrics"]["step_time_median_s"] * 1.3 * j for j in jitter]), *same[1:]]
    aa = _run_compare_step(tmp_path / "aa", [json.dumps(r) for r in same], base=[json.dumps(r) for r in base])
    assert aa.returncode == 0, aa.stdout + aa.stderr
    regressed = _run_compare_step(tmp_path / "slow", [json.dumps(r) for r in slow], base=[json.dumps(r) for r in base])
    assert regressed.returncode == 1, regressed.stdout + regressed.stderr
    summary = (tmp_path / "slow" / "summary.md").read_text()
    assert summary.startswith("**1 regression(s)**") and slow[0]["cell_id"] in summary
