"""Property-based fuzzing of result files (#27): generated corruptions of real
records (tests/data/fuzz-seed.jsonl: framework cells with launches and tuning;
tests/data/smoke-golden.jsonl: schema 1) — truncated and interleaved lines,
wrong types, NaN/inf, missing and extra fields, unknown schema versions,
enormous lines, HTML/script in labels and reasons, duplicate cell ids — fed to
`bench report`, `compare`, `ab`, `history`, `explain` and `export`.

Property: each command exits 0, 1 (compare's regression verdict) or 2 with an
`error:` line, never a traceback; a bad record is skipped and counted (the
report states how many, and the count equals the records `check_record`
refuses plus the lines that are not JSON); markup in a record never reaches a
page unescaped. Budgets: tests/fuzz_profiles.py.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import cli
from bench.run.record_check import check_record
from bench.run.results import SCHEMA_VERSION
from tests.conftest import ROOT
from tests.fuzz_profiles import examples

PAYLOAD = "<script>alert(1)</script>"
SEED = [json.loads(line) for name in ("fuzz-seed.jsonl", "smoke-golden.jsonl")
        for line in (ROOT / "tests" / "data" / name).read_text().splitlines()]
for _r in SEED:
    _r.update(suite="fuzz", run_id="seed")
IDS = [r["cell_id"] for r in SEED]

hostile = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.just(PAYLOAD), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _paths(value, prefix=()):
    """Every JSON path in a record (dict keys and list indices), bounded in depth."""
    yield prefix
    if len(prefix) > 6:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            yield from _paths(v, (*prefix, i))


def _set(record, path, value, delete=False):
    node = record
    for p in path[:-1]:
        node = node[p]
    if delete and isinstance(node, dict):
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


@st.composite
def corrupted_files(draw):
    """(file text, records the file holds, lines that are not a JSON object)."""
    records = copy.deepcopy(draw(st.lists(st.sampled_from(SEED), min_size=1, max_size=8)))
    for _ in range(draw(st.integers(1, 4))):
        rec = draw(st.sampled_from(records))
        kind = draw(st.sampled_from(["value", "nonfinite", "delete", "extra", "schema", "markup", "duplicate",
                                     "huge"]))
        paths = [p for p in _paths(rec) if p]
        path = draw(st.sampled_from(paths))
        if kind == "value":
            _set(rec, path, draw(hostile))
        elif kind == "nonfinite":
            _set(rec, path, draw(st.sampled_from([math.nan, math.inf, -math.inf])))
        elif kind == "delete":
            _set(rec, path, None, delete=True)
        elif kind == "extra":
            rec[draw(st.text(min_size=1, max_size=8))] = draw(hostile)
        elif kind == "schema":
            rec["schema_version"] = draw(st.one_of(st.integers(-5, 10**6), st.text(max_size=5), st.none()))
        elif kind == "markup":
            key = draw(st.sampled_from(["cell_label", "reason", "adapter", "status", "config"]))
            if key == "config":
                rec["config"] = {**rec["config"], draw(st.sampled_from(list(rec["config"]))): PAYLOAD}
            else:
                rec[key] = PAYLOAD
        elif kind == "duplicate":
            records.append(copy.deepcopy(rec))
        elif kind == "huge":
            rec["reason"] = "x" * draw(st.integers(10**5, 2 * 10**6))
    lines = [json.dumps(r) for r in records]
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["truncate", "interleave", "garbage", "array"]))
        if how == "truncate":
            lines[i] = lines[i][:draw(st.integers(0, max(len(lines[i]) - 1, 0)))]
        elif how == "interleave":
            j = draw(st.integers(0, len(lines) - 1))
            cut = draw(st.integers(1, 200))
            lines[i] = lines[i][:cut] + lines[j][cut:]
        elif how == "garbage":
            lines.insert(i, draw(st.text(max_size=50)).replace("\n", " "))
        else:
            lines.insert(i, "[1, 2, 3]")
    return "\n".join(lines) + "\n"


def _expected_skips(text: str) -> int:
    """Lines that are not a record, or a record `check_record` refuses, or one of a newer schema."""
    n = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            n += 1
            continue
        if not isinstance(rec, dict) or "cell_id" not in rec or check_record(rec) is not None:
            n += 1
        elif isinstance(rec.get("schema_version"), int) and rec["schema_version"] > SCHEMA_VERSION:
            n += 1
    return n


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    assert code in (0, 1, 2), (argv, code, text[-2000:])
    if code == 2:
        assert "error:" in text, text[-2000:]
    return code, text


def _pages(root: Path) -> list[str]:
    return [p.read_text(errors="replace") for p in root.rglob("*.html")]


@pytest.fixture
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-results")
    cwd = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(cwd)


@settings(max_examples=examples(12))
@given(corrupted_files())
def test_report_skips_and_counts_bad_records_and_escapes_markup(workdir, capsys, text):
    run = workdir / "results" / "fuzz" / "run.jsonl"
    run.parent.mkdir(parents=True, exist_ok=True)
    run.write_text(text)
    code, out = _run(capsys, "report", str(run), "--out", str(workdir / "reports"))
    for page in _pages(workdir / "reports"):
        assert PAYLOAD not in page
    if code == 0:
        skipped = _expected_skips(text)
        pages = "".join(_pages(workdir / "reports"))
        shown = re.findall(r"(\d+) record\(s\) skipped", pages)
        reasons = re.findall(r"<br><code>(.*?)</code>", pages)
        assert [int(x) for x in shown][:1] == ([skipped] if skipped else []), (shown, skipped, reasons)


@settings(max_examples=examples(40))
@given(corrupted_files(), st.sampled_from(["compare", "ab", "explain", "export", "history"]))
def test_analysis_commands_never_crash(workdir, capsys, text, command):
    base = workdir / "results" / "fuzz" / "base.jsonl"
    base.parent.mkdir(parents=True, exist_ok=True)
    base.write_text("".join(json.dumps(r) + "\n" for r in SEED))
    run = workdir / "results" / "fuzz" / "run.jsonl"
    run.write_text(text)
    out = workdir / "out"
    if command == "compare":
        _run(capsys, "compare", str(base), str(run), "--html", str(out / "c.html"))
    elif command == "ab":
        _run(capsys, "ab", str(run), "--knob", "zero", "--base", "0", "--cand", "3")
    elif command == "explain":
        _run(capsys, "explain", str(run), IDS[0], IDS[1], "--out", str(out))
    elif command == "export":
        _run(capsys, "export", str(run), "--csv", "-o", str(out / "x.csv"))
    else:
        os.utime(run, (1e9 + 10, 1e9 + 10))  # the newer run
        _run(capsys, "history", str(run.parent), "--out", str(out))
    for page in _pages(out) if out.exists() else []:
        assert PAYLOAD not in page


def test_real_records_are_never_skipped(workdir, capsys):
    """The guard that keeps a hostile record out of one section must never drop a real one."""
    run = workdir / "results" / "fuzz" / "run.jsonl"
    run.parent.mkdir(parents=True, exist_ok=True)
    run.write_text("".join(json.dumps(r) + "\n" for r in SEED))
    code, out = _run(capsys, "report", str(run), "--out", str(workdir / "reports"))
    assert code == 0 and "skipping" not in out
    (page,) = _pages(workdir / "reports")
    assert "record(s) skipped" not in page
    assert all(cell_id in page for cell_id in IDS)
