"""`bench compare`: A/A runs pass; an injected 20 % slowdown, measured in one
session of interleaved launches, is caught in one deterministic verdict, named
by cell and metric, with a significant exact U test on launch medians; two
launch groups that only differ in which launches landed in the machine's slow
mode are not a regression (they would be, on pooled steps)."""
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
    assert proc.stdout.startswith("**0 regression(s)**, 0 failed") and "in 2 matched cells" in proc.stdout
    assert all(f.verdict == "insufficient" for f in compare(base, cand) if f.metric == "step_time_s")  # 1 launch each
    findings = compare(base, cand)
    assert {f.metric for f in findings} == {"step_time_s", "peak_mem_bytes", "comm_bytes_per_step"}
    assert all(f.ratio == 1 for f in findings if f.metric == "comm_bytes_per_step")
    assert all(abs(f.ratio - 1) <= 0.01 for f in findings if f.metric == "peak_mem_bytes")


def test_injected_slowdown_is_a_regression_naming_cell_and_metric(tmp_path):
    """Base and candidate in one session: the same cell without and with the
    test-only `fault: slow` (+20 % per timed step), 6 interleaved launches each.
    The `small` model: ~190 ms steps, launch CV 2-5 % here (the `tiny` model's
    ~11 ms steps move 10-17 % between launches); 20 % at 5 launches a side was
    detected in 200 of 200 resamples (README "Launch statistics")."""
    (tmp_path / "s.yaml").write_text(
        "name: cmp\nsteps: 5\nwarmup: 2\ntimeout_s: 120\nrepeat: 6\n"
        "defaults: {model: small, world_size: 2, batch_size: 8, seq_len: 128, adapter: inhouse}\n"
        "matrix:\n  fault: [none, slow]\n")
    bench("run", str(tmp_path / "s.yaml"), "--results", str(tmp_path / "r"), "--run-id", "ab", "--no-progress")
    recs = [json.loads(line) for line in (tmp_path / "r" / "cmp" / "ab.jsonl").read_text().splitlines()]
    base, cand = tmp_path / "base.jsonl", tmp_path / "cand.jsonl"
    base.write_text(json.dumps(next(r for r in recs if r["config"]["fault"] == "none")) + "\n")
    slow = next(r for r in recs if r["config"]["fault"] == "slow")
    cand.write_text(json.dumps(slow) + "\n")
    proc = bench("compare", str(base), str(cand), "--md", str(tmp_path / "s.md"), "--html", str(tmp_path / "s.html"),
                 check=False)
    assert proc.returncode == 1, proc.stdout
    assert match_key(slow) == match_key(json.loads(base.read_text()))
    (finding,) = [f for f in compare(base, cand) if f.regressed]
    assert finding.metric == "step_time_s" and finding.key == match_key(slow) and finding.launches == (6, 6)
    assert finding.ratio > 1.05 and finding.p_value < 0.01 and finding.ratio_ci[0] > 1.0
    assert slow["cell_id"] in (tmp_path / "s.md").read_text() and "step_time_s" in (tmp_path / "s.md").read_text()
    assert "class='bad'" in (tmp_path / "s.html").read_text()
    # the same verdict straight from the run: `bench ab` splits it by the knob
    ab = bench("ab", str(tmp_path / "r" / "cmp" / "ab.jsonl"), "--knob", "fault", "--base", "none", "--cand", "slow",
               check=False)
    assert ab.returncode == 1 and ab.stdout.startswith("**1 regression(s)**") and "| 6/6 |" in ab.stdout, ab.stdout
    same = bench("ab", str(tmp_path / "r" / "cmp" / "ab.jsonl"), "--knob", "fault", "--base", "none", "--cand", "none",
                 check=False)
    assert same.returncode == 0 and "0 regression(s)" in same.stdout, same.stdout


def _launches(medians: list[float], steps: int = 10) -> list[dict]:
    from bench.run.launch_stats import launch_summary

    # steps of one launch agree closely (±0.5 %), as they do on the 2-core VMs
    return [launch_summary([m * (1 + 0.005 * ((i % 3) - 1)) for i in range(steps)], wall_s=1.0, start_unix=0.0,
                           fixed_cost_s=0.5) for m in medians]


def _with_launches(record: dict, medians: list[float]) -> dict:
    from bench.run.launch_stats import merge_launches

    launches = []
    for launch in _launches(medians):
        metrics = {**record["metrics"], "step_time_s": launch["step_time_s"], "step_time_median_s": launch["median_s"]}
        launches.append({**record, "metrics": metrics, "timing": {"wall_s": 1.0, "fixed_cost_s": 0.5}})
    return merge_launches(launches)


def test_launch_modes_are_not_a_regression(tmp_path):
    """Bimodal launches (the machine's fast and slow modes, ~1.0 and ~1.3): base got
    4 fast of 5, the candidate 4 slow of 5, by luck. Launch medians: p = 0.11,
    not a regression. Pooled steps would call it a 1.28× regression with p < 1e-6."""
    from scipy.stats import mannwhitneyu

    from tests.test_report_and_export import GOLDEN

    rec = json.loads(GOLDEN.read_text().splitlines()[0])
    b = _with_launches(rec, [1.00, 1.01, 0.99, 1.02, 1.31])
    c = _with_launches(rec, [1.30, 1.32, 1.29, 1.31, 1.005])
    base, cand = tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    base.write_text(json.dumps(b) + "\n")
    cand.write_text(json.dumps(c) + "\n")
    (time,) = [f for f in compare(base, cand) if f.metric == "step_time_s"]
    assert time.verdict != "regression" and time.launches == (5, 5), time
    pooled = mannwhitneyu(c["metrics"]["step_time_s"], b["metrics"]["step_time_s"], alternative="greater").pvalue
    assert pooled < 1e-6  # what the old test on pooled steps said


def test_five_launches_per_side_reach_alpha_four_do_not():
    from bench.analysis.compare import time_verdict

    base = [1.00, 1.01, 0.99, 1.02, 0.98]
    assert time_verdict(base, [x * 1.2 for x in base], alpha=0.01, threshold=0.05)[0] == "regression"
    assert time_verdict(base[:4], [x * 1.2 for x in base[:4]], alpha=0.01, threshold=0.05)[0] == "insufficient"
    assert time_verdict(base, [x * 0.8 for x in base], alpha=0.01, threshold=0.05)[0] == "improvement"
    assert time_verdict(base, [x * 1.01 for x in base], alpha=0.01, threshold=0.05)[0] == "same"


def test_a_failed_cell_is_a_regression(tmp_path):
    from tests.test_report_and_export import GOLDEN

    recs = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    broken = dict(recs[0], status="error", reason="boom", metrics=None)
    base, cand = tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    base.write_text(json.dumps(recs[0]) + "\n")
    cand.write_text(json.dumps(broken) + "\n")
    findings = compare(base, cand)
    assert [(f.metric, f.verdict) for f in findings] == [("status", "failed")]
