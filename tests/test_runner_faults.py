"""Failures are results: crash, hang (timeout kills the whole group), OOM
(torch's allocator and Python's MemoryError), segfault, abort; and a runner
killed with SIGKILL resumes with one record per cell."""
from __future__ import annotations

import json

import psutil
import pytest

from tests.conftest import bench, records, sigkill_runner_when

FAULTS = """
name: {name}
steps: 2
warmup: 1
timeout_s: {timeout}
defaults: {{model: tiny, world_size: 2, batch_size: 4, seq_len: 16}}
matrix:
  fault: {faults}
"""
HANG_TIMEOUT_S = 20
"""The hang runs as a suite of its own, so the other cells get a timeout that a
loaded 2-core machine cannot hit (cells there take up to ~20 s to start)."""


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    recs = {}
    for name, timeout, faults in (("faults", 180, "[raise, oom, memory_error, segfault, abort, none]"),
                                  ("faults-hang", HANG_TIMEOUT_S, "[hang]")):
        (tmp / f"{name}.yaml").write_text(FAULTS.format(name=name, timeout=timeout, faults=faults))
        proc = bench("run", str(tmp / f"{name}.yaml"), "--results", str(tmp / "results"), "--no-progress")
        recs.update({r["config"]["fault"]: r for r in records(tmp / "results", name)})
    return tmp, recs, proc


def test_one_failing_cell_never_stops_the_suite(fault_run):
    _, recs, proc = fault_run
    assert set(recs) == {"raise", "hang", "oom", "memory_error", "segfault", "abort", "none"}
    assert recs["none"]["status"] == "ok"


def test_crash_is_an_error_with_the_reason(fault_run):
    rec = fault_run[1]["raise"]
    assert rec["status"] == "error"
    assert "injected fault: raise" in rec["reason"]
    assert "RuntimeError" in rec["stderr_tail"]


def test_failed_allocation_is_oom(fault_run):
    rec = fault_run[1]["oom"]
    assert rec["status"] == "oom", rec["reason"]
    assert "can't allocate memory" in rec["reason"]


def test_python_memory_error_is_oom(fault_run):
    rec = fault_run[1]["memory_error"]
    assert rec["status"] == "oom", rec["reason"]
    assert rec["reason"].startswith("MemoryError"), rec["reason"]


def test_abort_is_an_error_naming_the_signal(fault_run):
    rec = fault_run[1]["abort"]
    assert rec["status"] == "error"
    assert "rank 1 killed by SIGABRT" in rec["reason"], rec["reason"]


def test_segfault_is_an_error_naming_the_signal(fault_run):
    rec = fault_run[1]["segfault"]
    assert rec["status"] == "error"
    assert "SIGSEGV" in rec["reason"] or "signal 11" in rec["reason"], rec["reason"]


def test_hang_times_out_within_limit_and_leaves_no_process(fault_run):
    tmp, recs, _ = fault_run
    rec = recs["hang"]
    assert rec["status"] == "timeout"
    assert HANG_TIMEOUT_S <= rec["timing"]["wall_s"] <= HANG_TIMEOUT_S + 5
    pid_files = list((tmp / "results" / "faults-hang").glob(f".*/{rec['cell_id']}/rank*.pid"))
    assert len(pid_files) == 2, "both ranks had started and recorded their pids"
    for f in pid_files:
        pid = int(f.read_text())
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"rank pid {pid} survived"


RESUME = """
name: resume
steps: 3
warmup: 1
timeout_s: 120
defaults: {model: tiny, world_size: 2, batch_size: 4, seq_len: 16}
matrix:
  adapter: [inhouse, torch]
  microbatches: [1, 2]
"""


def test_sigkill_mid_suite_then_resume_gives_one_record_per_cell(tmp_path):
    (tmp_path / "suite.yaml").write_text(RESUME)
    results = tmp_path / "results"
    run_file = results / "resume" / "killed.jsonl"
    family = sigkill_runner_when(tmp_path / "suite.yaml", results, "killed",
                                 lambda: run_file.exists() and run_file.read_text().count("\n") >= 1)
    assert run_file.exists(), "the first cell never finished"
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "orphans after SIGKILL"
    before = records(results, "resume")
    assert 1 <= len(before) < 4
    # A kill during a write leaves a torn line: it must be skipped, not fatal.
    with open(run_file, "a") as f:
        f.write('{"schema_version": 1, "cell_id": "torn')
    out = bench("run", str(tmp_path / "suite.yaml"), "--results", str(results), "--resume", "killed", "--no-progress")
    assert f"{len(before)} already recorded" in out.stdout
    lines = [line for line in run_file.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            assert line.startswith('{"schema_version": 1, "cell_id": "torn')
    ids = [r["cell_id"] for r in parsed]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert all(r["status"] == "ok" for r in parsed), [(r["status"], r["reason"], (r.get("stderr_tail") or "")[-600:]) for r in parsed if r["status"] != "ok"]
    assert [r["cell_id"] for r in parsed[: len(before)]] == [r["cell_id"] for r in before]  # nothing lost or rewritten
