"""Report, export, list and doctor on a golden results file (a real smoke run)."""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

from tests.conftest import ROOT, bench

GOLDEN = ROOT / "tests" / "data" / "smoke-golden.jsonl"


def _with_hostile_record(tmp_path):
    lines = GOLDEN.read_text().splitlines()
    hostile = json.loads(lines[0])
    hostile.update(cell_id="evil0000", status="error", reason="<script>alert('x')</script>", metrics=None,
                   theory_ratio={}, stderr_tail="<img src=x onerror=alert(1)>")
    path = tmp_path / "smoke" / "golden.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join([*lines, json.dumps(hostile)]) + "\n")
    return path


def test_report_renders_every_cell_and_escapes_names(tmp_path):
    results = _with_hostile_record(tmp_path)
    out = bench("report", str(results.parent), "--out", str(tmp_path / "reports")).stdout
    page = (tmp_path / "reports" / "smoke" / "golden" / "index.html").read_text()
    assert "index.html" in out
    for line in GOLDEN.read_text().splitlines():
        assert json.loads(line)["cell_id"] in page
    assert "<script>alert" not in page and "&lt;script&gt;" in page  # the page's one script is its own
    assert "<img src=x" not in page
    assert page.count("data:image/png;base64,") >= 4  # self-contained plots
    assert "http://" not in page and "https://" not in page
    assert "comm_bytes_per_step" in page and "1.0000" in page  # measured ÷ theory


def test_report_does_not_import_torch(tmp_path):
    results = _with_hostile_record(tmp_path)
    code = ("import sys; from bench.analysis.report import write_report; from pathlib import Path; "
            f"write_report(Path({str(results)!r}), Path({str(tmp_path / 'r')!r})); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_export_csv_has_one_flat_row_per_record(tmp_path):
    out = bench("export", str(GOLDEN), "--csv").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == len(GOLDEN.read_text().splitlines())
    assert {"cell_id", "status", "config.dp", "metrics.tokens_per_s", "theory.comm_bytes_per_step", "env.versions.torch"} <= set(rows[0])
    assert all(float(r["metrics.step_time_median_s"]) > 0 for r in rows)


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "smoke" / "x.jsonl"
    path.parent.mkdir(parents=True)
    shutil.copy(GOLDEN, path)
    with open(path, "a") as f:
        f.write('{"cell_id": "half')
    proc = bench("export", str(path), "--csv")
    assert len(list(csv.DictReader(io.StringIO(proc.stdout)))) == len(GOLDEN.read_text().splitlines())
    assert "torn or malformed" in proc.stderr


def test_list_shows_support_matrix():
    out = bench("list").stdout
    assert "data_parallel" in out and "inhouse" in out and "torch" in out
    assert "unsupported" in out  # techniques not implemented yet say so


def test_doctor_reports_versions_and_adapters():
    out = bench("doctor").stdout
    assert "torch" in out and "adapter inhouse" in out and "available" in out
