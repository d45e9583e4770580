"""The report in a real browser: Debian's headless `chromium` opens a report
built from the golden records and must show no console errors, load every
image (naturalWidth > 0) and list every cell in the results table; a
full-page screenshot is saved under the test's tmp dir.

How: the page has no scripts of its own, so a copy of it gets a probe script
as the first child of <head> (it sees every error event, console.error/warn
call and failed resource load from then on). On `load` the probe writes what
it found as JSON into a <pre> that `--dump-dom` prints. `--enable-logging=stderr`
also puts every page console message on stderr as a `CONSOLE` line; any such
line counts as an error too (a report with no scripts has nothing to log).
The screenshot is taken of the unmodified page, the window as tall as the page.

Chromium comes from the set-up step (scripts/setup_env.sh). Absent, the test
fails under CI=true (set-up should have installed it) and skips otherwise.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_report_and_export import GOLDEN

SWEEP = ROOT / "tests" / "data" / "sweep-golden.jsonl"

WIDTH = 1280
PROBE = """<script>
window.__tb = {errors: []};
addEventListener("error", e => __tb.errors.push(e.message ? "error: " + e.message
  : "failed to load: " + (e.target && e.target.outerHTML || "?").slice(0, 120)), true);
addEventListener("unhandledrejection", e => __tb.errors.push("unhandled rejection: " + e.reason));
for (const level of ["error", "warn"]) {
  const orig = console[level];
  console[level] = (...a) => { __tb.errors.push("console." + level + ": " + a.join(" ")); orig.apply(console, a); };
}
addEventListener("load", () => {
  const table = document.getElementById("results-table");
  const verdict = document.getElementById("verdict");
  const external = [...document.querySelectorAll("[src],[href]")].map(e => e.getAttribute("src") || e.getAttribute("href"))
    .filter(u => /^(https?:)?\/\//.test(u));
  let sorted = null;
  if (table) {  // click the "step ms" header and read the column back
    const col = [...table.rows[0].cells].findIndex(c => c.title === "step_time_ms");
    if (col >= 0) {
      table.rows[0].cells[col].click();
      sorted = [...table.rows].slice(1).map(r => r.cells[col].dataset.v ?? null);
    }
  }
  const out = {
    verdict_top: verdict ? verdict.getBoundingClientRect().top : null,
    verdict_rows: document.getElementById("verdict-table") ? document.getElementById("verdict-table").rows.length - 1 : 0,
    external: external,
    sorted_step_ms: sorted,
    filters: document.querySelectorAll("input.filter").length,
    config_maps: document.querySelectorAll("#config-map img").length,
    errors: __tb.errors,
    images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth,
                                           naturalHeight: i.naturalHeight, shownWidth: i.getBoundingClientRect().width})),
    results_cells: table ? [...table.rows].slice(1).map(r => (r.cells[0].title || r.cells[0].textContent).split(" — ")[0].trim()) : null,
    results_header: table ? [...table.rows[0].cells].map(c => c.textContent.trim()) : null,
    page_height: document.documentElement.scrollHeight,
    page_width: document.documentElement.scrollWidth,
  };
  const pre = document.createElement("pre");
  pre.id = "tb-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium_binary() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = chromium_binary()
    if binary is None:
        msg = ("headless browser test needs Debian's `chromium` (not found on PATH; $CHROMIUM may name it). "
               "scripts/setup_env.sh installs it: apt-get install -y chromium")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(msg + " — CI=true, so set-up should have installed it", pytrace=False)
        pytest.skip(msg)
    return binary


def _run(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@dataclass
class PageCheck:
    probe: dict
    console: list[str]  # CONSOLE lines chromium logged for the page


def check_page(binary: str, page: Path, workdir: Path) -> PageCheck:
    """Open a copy of `page` with the probe injected; what the probe and chromium's log saw."""
    text = page.read_text()
    probed = workdir / f"{page.stem}-probed.html"
    head = re.search(r"<head[^>]*>", text, flags=re.I)
    assert head, f"{page} has no <head>"
    probed.write_text(text[: head.end()] + PROBE + text[head.end():])
    proc = _run(binary, workdir / "profile", "--dump-dom", "--virtual-time-budget=10000",
                "--enable-logging=stderr", "--v=0", probed.as_uri())
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    found = re.search(r'<pre id="tb-probe">(.*?)</pre>', proc.stdout, flags=re.S)
    assert found, f"the probe wrote nothing (page never fired load?):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"

    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return PageCheck(json.loads(html.unescape(found.group(1))), console)


def section_screenshot(binary: str, page: Path, section: str, out: Path, height: int = 900) -> Path:
    """A screenshot of one section: a copy of the page that shows only it."""
    text = page.read_text()
    alone = out.with_suffix(".html")
    alone.write_text(text.replace("</head>", f"<style>body>*{{display:none}}body>#{section}{{display:block}}</style></head>", 1))
    return screenshot(binary, alone, out, height)


def screenshot(binary: str, page: Path, out: Path, height: int) -> Path:
    proc = _run(binary, out.parent / "profile", f"--screenshot={out}", f"--window-size={WIDTH},{height}", page.as_uri())
    assert proc.returncode == 0 and out.exists(), f"no screenshot ({proc.returncode}):\n{proc.stderr[-2000:]}"
    return out


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_report_renders_in_headless_chromium(chromium, tmp_path):
    """The smoke report: verdict first (above the fold at 1280 × 900), every cell listed
    by its label with its id on hover, sortable and filterable tables, images loaded,
    nothing fetched from the network, no console error; screenshots of the top, one
    technique group's plots and the whole page are saved for review."""
    from bench.analysis.report import write_report

    page = write_report(GOLDEN, tmp_path / "reports")
    result = check_page(chromium, page, tmp_path)
    probe = result.probe

    assert probe["errors"] == [] and result.console == [], (probe["errors"], result.console)
    assert probe["external"] == [], probe["external"]
    assert 'id="skipped"' not in page.read_text()  # every section took every record
    assert probe["verdict_top"] is not None and probe["verdict_top"] < 900, probe["verdict_top"]
    assert probe["verdict_rows"] >= 1  # the golden run has cells under two adapters
    # Six golden cells give step time, tokens/s, peak memory, communication and MFU plots.
    assert len(probe["images"]) >= 5, probe["images"]
    for img in probe["images"]:
        assert img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0, img
        assert 0 < img["shownWidth"] <= WIDTH, img
    expected = [json.loads(line)["cell_id"] for line in GOLDEN.read_text().splitlines()]
    assert sorted(probe["results_cells"]) == sorted(expected)
    assert probe["results_header"][:3] == ["cell", "status", "step ms"]  # units in headers
    ms = [float(v) for v in probe["sorted_step_ms"] if v is not None]  # after one click: ascending
    assert len(ms) >= 5 and ms == sorted(ms), probe["sorted_step_ms"]
    assert probe["page_width"] <= WIDTH  # no horizontal overflow: wide tables scroll inside their box

    top = screenshot(chromium, page, tmp_path / "report-top.png", height=900)
    group = section_screenshot(chromium, page, "plots", tmp_path / "report-plots.png", height=1400)
    shot = screenshot(chromium, page, tmp_path / "report.png", height=min(probe["page_height"], 16000))
    width, height = _png_size(shot)
    assert width == WIDTH and height >= min(probe["page_height"], 16000) * 0.9
    for png in (top, group, shot):
        assert png.stat().st_size > 20_000, png  # a blank page compresses to a few KB
    print(f"screenshots: {top}, {group}, {shot}; page {probe['page_width']}x{probe['page_height']}, "
          f"{page.stat().st_size / 1024:.0f} KiB")


def test_sweep_report_draws_the_configuration_map(chromium, tmp_path):
    """A layout sweep (dp/tp/pp × micro-batches × ZeRO, with the planner's
    predictions): the configuration map's two heat maps, screenshot saved."""
    from bench.analysis.report import write_report

    page = write_report(SWEEP, tmp_path / "reports")
    result = check_page(chromium, page, tmp_path)
    probe = result.probe
    assert probe["errors"] == [] and result.console == [] and probe["external"] == []
    assert probe["config_maps"] == 2, probe
    assert probe["verdict_top"] < 900
    assert "the planner&#39;s pick" in page.read_text() or "the planner's pick" in page.read_text()  # sweep verdict
    top = screenshot(chromium, page, tmp_path / "sweep-top.png", height=900)
    cmap = section_screenshot(chromium, page, "config-map", tmp_path / "sweep-config-map.png", height=1100)
    assert cmap.stat().st_size > 20_000
    print(f"screenshots: {top}, {cmap}")


def test_probe_catches_broken_images_and_script_errors(chromium, tmp_path):
    """The checks above can fail: a page with a truncated PNG and a throwing script."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body>"
                   "<img alt='broken' src='data:image/png;base64,iVBORw0KGgoAAAA'>"
                   "<table id='results-table'><tr><th>cell</th></tr><tr><td>abc</td></tr></table>"
                   "<script>console.error('bad number'); notDefined();</script></body></html>")
    result = check_page(chromium, bad, tmp_path)
    errors = " | ".join(result.probe["errors"])
    assert "console.error: bad number" in errors and "notDefined" in errors and "failed to load" in errors
    assert any("notDefined" in line for line in result.console)
    (img,) = result.probe["images"]
    assert img["naturalWidth"] == 0
    assert result.probe["results_cells"] == ["abc"]


def test_history_page_renders_in_headless_chromium(chromium, tmp_path):
    from bench.analysis.history import write_history
    from tests.test_history import write_runs

    write_runs(tmp_path / "smoke", 6, seed=0, time_factor=lambda cell, run: 1.3 if cell == 0 and run >= 3 else 1.0)
    page, _runs, steps = write_history(tmp_path / "smoke", tmp_path / "history.html")
    result = check_page(chromium, page, tmp_path)
    probe = result.probe
    assert probe["errors"] == [] and result.console == [], (probe["errors"], result.console)
    assert len(probe["images"]) == 4
    for img in probe["images"]:
        assert img["complete"] and img["naturalWidth"] > 0 and 0 < img["shownWidth"] <= WIDTH, img
    assert len(steps) == 2
    shot = screenshot(chromium, page, tmp_path / "history.png", height=min(probe["page_height"], 16000))
    assert _png_size(shot)[0] == WIDTH
    print(f"screenshot: {shot}")
