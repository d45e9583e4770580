"""The all-reduce workload through the harness: validated algorithms, bytes
equal to each algorithm's theory, nccl-tests bandwidths, and a report plot."""
from __future__ import annotations

import pytest

from bench.config.suite import SuiteError, parse_suite
from tests.conftest import bench, records

SUITE = """
name: comm-test
steps: 4
warmup: 1
timeout_s: 120
defaults: {workload: allreduce, message_bytes: 1048576, world_size: 2}
matrix:
  allreduce: [backend, ring]
include:
  - {allreduce: ps, world_size: 3}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comm")
    (tmp / "suite.yaml").write_text(SUITE)
    bench("run", str(tmp / "suite.yaml"), "--results", str(tmp / "results"), "--no-progress")
    bench("report", str(tmp / "results" / "comm-test"), "--out", str(tmp / "reports"))
    return tmp, records(tmp / "results", "comm-test")


def test_bytes_match_each_algorithms_theory(run):
    _, recs = run
    assert [r["status"] for r in recs] == ["ok"] * 3, [r["reason"] for r in recs]
    for r in recs:
        assert abs(r["theory_ratio"]["comm_bytes_per_step"] - 1) < 0.01, r["config"]["allreduce"]
    ps = next(r for r in recs if r["config"]["allreduce"] == "ps")
    # The server sends (N−1)·S; each worker sends S.
    assert sorted(ps["metrics"]["comm_bytes_per_step_by_rank"]) == [2**20, 2**20, 2 * 2**20]


def test_bandwidths_follow_nccl_tests(run):
    _, recs = run
    for r in recs:
        m, n = r["metrics"], r["config"]["world_size"]
        assert m["algbw_bytes_per_s"] == pytest.approx(2**20 / m["step_time_median_s"])
        assert m["busbw_bytes_per_s"] == pytest.approx(m["algbw_bytes_per_s"] * 2 * (n - 1) / n)
        assert "validated_against" in r["notes"]


def test_report_plots_busbw(run):
    tmp, _ = run
    page = next((tmp / "reports" / "comm-test").glob("*/index.html")).read_text()
    assert 'alt="all-reduce busbw"' in page


def test_workload_rejects_other_adapters():
    with pytest.raises(SuiteError, match="use adapter = 'inhouse'"):
        parse_suite("name: x\ndefaults: {workload: allreduce, adapter: torch, world_size: 2}\n")
    with pytest.raises(SuiteError, match="multiple of 4"):
        parse_suite("name: x\ndefaults: {workload: allreduce, message_bytes: 1023, world_size: 2}\n")


def test_comm_suite_validates():
    from bench.config.suite import load_suite
    from tests.conftest import ROOT

    _, cells = load_suite(ROOT / "suites" / "comm.yaml")
    assert len(cells) == 60
    assert {c.knobs.message_bytes for c in cells} == {2**10, 2**16, 2**20, 2**24, 2**26, 2**28}
