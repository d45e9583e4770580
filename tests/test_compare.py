"""`bench compare`: A/A runs pass; an injected 20 % slowdown is caught, named by
cell and metric, with a significant Mann-Whitney U test."""
from __future__ import annotations

import json

from bench.analysis.compare import compare, match_key
from tests.conftest import bench

SUITE = """
name: cmp
steps: 15
warmup: 2
timeout_s: 120
defaults: {model: tiny, world_size: 2, batch_size: 8, seq_len: 32}
matrix:
  adapter: [inhouse, torch]
"""


def test_a_a_runs_do_not_regress(tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE)
    for run in ("a1", "a2"):
        bench("run", str(tmp_path / "s.yaml"), "--results", str(tmp_path / "r"), "--run-id", run, "--no-progress")
    base, cand = tmp_path / "r" / "cmp" / "a1.jsonl", tmp_path / "r" / "cmp" / "a2.jsonl"
    # Memory and communication are deterministic: default thresholds. Step time
    # is not, across launches on this 2-core VM: whole launches of the same cell
    # land in one of two modes, ~13 ms or ~24 ms per step (every sample of the
    # launch shifted; seen for both adapters), so a cross-run time ratio of up to
    # ~1.9 is machine noise here and the time threshold of this A/A check is
    # 100 %. The 5 % default is for dedicated nodes; the slowdown test below
    # measures base and candidate in one run instead.
    # Communication and the CPU live-tensor peak are exact. The peak once
    # differed by one DDP gradient bucket between launches (ratio 1.13 on tiny):
    # the tracker missed the bucket's free when gloo's worker thread made it
    # (bench.meters.memory); since it counts those, 4 launches of each adapter
    # read the same bytes, so the default memory threshold applies.
    proc = bench("compare", str(base), str(cand), "--time-threshold", "1.0", check=False)
    assert proc.returncode == 0, proc.stdout
    assert "**0 regression(s)** in 2 matched cells" in proc.stdout
    findings = compare(base, cand)
    assert {f.metric for f in findings} == {"step_time_s", "peak_mem_bytes", "comm_bytes_per_step"}
    assert all(f.ratio == 1 for f in findings if f.metric == "comm_bytes_per_step")
    assert all(abs(f.ratio - 1) <= 0.01 for f in findings if f.metric == "peak_mem_bytes")


def _slowdown_pair(tmp_path, attempt: int):
    """Base and candidate measured in one run (adjacent launches share the
    machine's speed mode far more often than separate runs do): the same cell
    without and with the test-only `fault: slow` (+20 % per timed step)."""
    (tmp_path / "s.yaml").write_text(SUITE.replace("matrix:\n  adapter: [inhouse, torch]",
                                                   "matrix:\n  adapter: [inhouse]\n  fault: [none, slow]"))
    run = f"one{attempt}"
    bench("run", str(tmp_path / "s.yaml"), "--results", str(tmp_path / "r"), "--run-id", run, "--no-progress")
    recs = [json.loads(line) for line in (tmp_path / "r" / "cmp" / f"{run}.jsonl").read_text().splitlines()]
    base, cand = tmp_path / f"base{attempt}.jsonl", tmp_path / f"cand{attempt}.jsonl"
    base.write_text(json.dumps(next(r for r in recs if r["config"]["fault"] == "none")) + "\n")
    slow = next(r for r in recs if r["config"]["fault"] == "slow")
    cand.write_text(json.dumps(slow) + "\n")
    return base, cand, slow


def test_injected_slowdown_is_a_regression_naming_cell_and_metric(tmp_path):
    # Whole launches on this VM sometimes shift by ~40 % (single-process cells
    # too: 10.5 vs 14-15 ms); a pair that straddles a shift is re-measured, at
    # most three times.
    for attempt in range(3):
        base, cand, slow = _slowdown_pair(tmp_path, attempt)
        proc = bench("compare", str(base), str(cand), "--md", str(tmp_path / "s.md"), "--html", str(tmp_path / "s.html"),
                     check=False)
        if proc.returncode == 1:
            break
    assert proc.returncode == 1, proc.stdout
    assert match_key(slow) == match_key(json.loads(base.read_text()))
    (finding,) = [f for f in compare(base, cand) if f.regressed]
    assert finding.metric == "step_time_s" and finding.key == match_key(slow)
    assert finding.ratio > 1.05 and finding.p_value < 0.05
    assert slow["cell_id"] in (tmp_path / "s.md").read_text() and "step_time_s" in (tmp_path / "s.md").read_text()
    assert "class='bad'" in (tmp_path / "s.html").read_text()


def test_a_failed_cell_is_a_regression(tmp_path):
    from tests.test_report_and_export import GOLDEN

    recs = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    broken = dict(recs[0], status="error", reason="boom", metrics=None)
    base, cand = tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    base.write_text(json.dumps(recs[0]) + "\n")
    cand.write_text(json.dumps(broken) + "\n")
    findings = compare(base, cand)
    assert [(f.metric, f.regressed) for f in findings] == [("status", True)]
