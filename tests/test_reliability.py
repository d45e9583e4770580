"""Reliability and security (#11): full or unwritable results folders, two
runners on one folder, hostile names, and a local rendezvous that listens
only on loopback. The fault matrix itself is tests/test_runner_faults.py."""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.run.launchers.torchrun import LocalTorchrun
from bench.run.results import ResultsWriteError, RunFile, RunInUse, read_records
from bench.config.suite import SuiteError, parse_suite
from tests.conftest import ROOT, bench

# Cells an adapter refuses before launch (DeepSpeed 0.19.8 dropped OneBitAdam):
# each costs one record and no torchrun, so the records are the only writes.
REFUSED = """
name: refused
defaults: {adapter: deepspeed, optimizer: onebit_adam, model: tiny, world_size: 1, batch_size: 4}
matrix:
  seq_len: [16, 32, 48, 64]
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.cli", *args]


def _flat(text: str) -> str:
    return " ".join(text.split())


# --- full disk -------------------------------------------------------------------------

def test_full_disk_mid_run_keeps_whole_records_then_resumes(tmp_path):
    """A real kernel-enforced write limit (RLIMIT_FSIZE; Python ignores SIGXFSZ,
    so write() fails with EFBIG after a partial write), the same path as ENOSPC."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(REFUSED)
    results = tmp_path / "results"
    limit = 4096  # room for a record or two (~1.8 kB each here), never all four

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(_cli("run", str(suite), "--results", str(results), "--run-id", "capped", "--no-progress"),
                          cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    run_file = results / "refused" / "capped.jsonl"
    raw = run_file.read_bytes()
    kept = [json.loads(line) for line in raw.decode().splitlines()]  # every line whole
    size = len(raw) // len(kept)
    assert 1 <= len(kept) < 4 and len(raw) == len(kept) * size and raw.endswith(b"\n")
    assert len(raw) + size > limit and len(raw) < limit, "the next record was cut part way, then removed"
    assert proc.returncode == 3, proc.stderr
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert f"the {len(kept)} record(s) already in" in _flat(proc.stderr) and "--resume capped" in proc.stderr

    out = bench("run", str(suite), "--results", str(results), "--resume", "capped", "--no-progress").stdout
    assert f"{len(kept)} already recorded" in out
    ids = [r["cell_id"] for r in read_records(run_file)]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert ids[: len(kept)] == [r["cell_id"] for r in kept]  # nothing lost or rewritten


def test_enospc_partial_write_is_cut_off(tmp_path, monkeypatch):
    run = RunFile(tmp_path, "s", "r")
    whole = {"suite": "s", "run_id": "r", "adapter": "inhouse", "config": {}}  # what a reader needs of a record
    run.append({**whole, "cell_id": "a", "status": "ok"})
    before = run.path.read_bytes()
    real_write = os.write
    calls = []

    def disk_fills(fd: int, data) -> int:  # the first half lands, then the disk is full
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_fills)
    with pytest.raises(ResultsWriteError) as info:
        run.append({**whole, "cell_id": "b", "status": "ok", "pad": "x" * 1000})
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert "No space left on device" in str(info.value) and str(run.path) in str(info.value)
    assert len(calls) == 2
    assert run.path.read_bytes() == before  # the torn half is gone
    run.append({**whole, "cell_id": "c", "status": "ok"})
    assert [r["cell_id"] for r in run.records()] == ["a", "c"]


# --- unwritable results folder ---------------------------------------------------------

def test_unwritable_results_folder_is_a_clear_error_before_launch(tmp_path):
    """A folder the runner really cannot write; an existing run in it is left as
    it was. Root ignores file modes through CAP_DAC_OVERRIDE, so a root runner
    gets that capability dropped from its bounding set (it stays uid 0)."""
    (tmp_path / "suite.yaml").write_text(REFUSED)
    results = tmp_path / "results"
    (results / "refused").mkdir(parents=True)
    old = results / "refused" / "old.jsonl"
    old.write_text('{"cell_id": "x", "status": "ok"}\n')
    try:
        for d in (results, results / "refused"):
            d.chmod(0o555)
        preexec = _drop_dac_override if os.geteuid() == 0 else None
        for extra in ([], ["--resume", "old"]):
            proc = subprocess.run(_cli("run", str(tmp_path / "suite.yaml"), "--results", str(results), "--no-progress", *extra),
                                  cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=preexec)
            assert proc.returncode == 2, proc.stderr
            assert f"results directory {results} is not writable" in _flat(proc.stderr)
            assert "Permission denied" in _flat(proc.stderr)
            assert "Traceback" not in proc.stderr
        assert old.read_text() == '{"cell_id": "x", "status": "ok"}\n'
        assert sorted(p.name for p in results.rglob("*")) == ["old.jsonl", "refused"]  # nothing launched
    finally:
        for d in (results, results / "refused"):
            d.chmod(0o755)


def _drop_dac_override() -> None:
    import ctypes

    PR_CAPBSET_DROP, CAP_DAC_OVERRIDE = 24, 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


# --- two runners, one results folder ---------------------------------------------------

CONCURRENT = """
name: conc
steps: 2
warmup: 1
timeout_s: 120
defaults: {model: tiny, world_size: 1, batch_size: 4, seq_len: 16}
matrix:
  adapter: [inhouse]
include:
  - {adapter: deepspeed, optimizer: onebit_adam}
  - {adapter: deepspeed, optimizer: onebit_adam, seq_len: 32}
"""


def test_concurrent_runs_into_one_results_folder(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(CONCURRENT)
    results = tmp_path / "results"
    common = ("run", str(suite), "--results", str(results), "--no-progress")
    a = subprocess.Popen(_cli(*common, "--run-id", "shared"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    c = subprocess.Popen(_cli(*common), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = results / "conc" / ".shared.lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        for runner in (a, c):  # a runner that exits before A holds its run failed to start
            assert runner.poll() is None or lock.exists(), runner.communicate()[1]
        time.sleep(0.05)
    assert lock.read_text().strip() == str(a.pid), "runner A holds its run"
    # A second runner on the same run id is refused while A runs (it would repeat
    # A's cells and delete A's scratch folders).
    b = bench(*common, "--run-id", "shared", check=False)
    assert a.poll() is None, "A finished before B tried: the test proved nothing"
    assert b.returncode == 2
    assert f"run shared of suite conc is being written by another bench run (pid {a.pid})" in _flat(b.stderr)
    a_out, a_err = a.communicate(timeout=180)
    c_out, c_err = c.communicate(timeout=180)
    assert a.returncode == 0 and c.returncode == 0, a_err + c_err
    files = sorted((results / "conc").glob("*.jsonl"))
    assert len(files) == 2
    cells = [cell.id for cell in parse_suite(CONCURRENT)[1]]
    for f in files:
        recs = [json.loads(line) for line in f.read_text().splitlines()]  # every line whole
        assert sorted(r["cell_id"] for r in recs) == sorted(cells)
        assert {r["run_id"] for r in recs} == {f.stem}
        assert [r["status"] for r in recs].count("ok") == 1
    with RunFile(results, "conc", "shared").lock():  # released once A is done
        pass


def test_lock_is_released_when_its_holder_dies(tmp_path):
    run = RunFile(tmp_path, "s", "r")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from bench.run.results import RunFile; "
        f"run = RunFile(Path({str(tmp_path)!r}), 's', 'r'); held = run.lock(); held.__enter__(); print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunInUse, match=f"pid {holder.pid}"):
        with run.lock():
            pass
    holder.kill()  # SIGKILL: no clean-up code runs
    holder.wait()
    with run.lock():
        pass


# --- hostile names ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a/b", "../up", "..", "x\\\\y", "<script>alert(1)</script>", "a b", "'quoted'"])
def test_suite_names_with_separators_or_markup_are_rejected(name):
    with pytest.raises(SuiteError, match="name = "):
        parse_suite(f'name: "{name}"\n')


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "<b>x</b>", ".hidden", "/abs"])
def test_run_ids_with_separators_or_markup_are_rejected_before_launch(tmp_path, run_id):
    suite = tmp_path / "suite.yaml"
    suite.write_text(REFUSED)
    proc = bench("run", str(suite), "--results", str(tmp_path / "results"), "--run-id", run_id, "--no-progress", check=False)
    assert proc.returncode == 2
    assert f"run id {run_id!r} must be letters" in _flat(proc.stderr)
    assert [p.name for p in tmp_path.iterdir()] == ["suite.yaml"]  # nothing created, nothing launched


def test_result_paths_are_confined_to_the_results_root(tmp_path):
    assert RunFile(tmp_path, "ok", "r1").path == tmp_path / "ok" / "r1.jsonl"
    for suite, run_id in (("../out", "r"), ("ok", "../../r"), ("/etc", "r"), ("ok", "a/b")):
        with pytest.raises(ValueError):
            RunFile(tmp_path, suite, run_id).path  # noqa: B018 - the property validates


def test_report_refuses_record_names_that_leave_the_reports_root(tmp_path):
    golden = json.loads((ROOT / "tests" / "data" / "smoke-golden.jsonl").read_text().splitlines()[0])
    for bad in ({"suite": "../../escaped"}, {"run_id": "../../escaped"}, {"suite": "<script>x</script>"}):
        path = tmp_path / "in" / "run.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({**golden, **bad}) + "\n")
        proc = bench("report", str(path), "--out", str(tmp_path / "out" / "reports"), check=False)
        assert proc.returncode == 2 and "no report written" in proc.stderr, proc.stderr
        assert not [p for p in tmp_path.rglob("*") if "escaped" in p.name or p.name == "index.html"]


def test_names_are_escaped_in_the_report_page(tmp_path):
    from bench.analysis.report import write_report

    lines = (ROOT / "tests" / "data" / "smoke-golden.jsonl").read_text().splitlines()
    recs = [{**json.loads(line), "suite": "s<i>x", "run_id": "r&<b>", "adapter": "<img src=x>"} for line in lines]
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    page = write_report(path, tmp_path / "reports").read_text()
    assert "s&lt;i&gt;x" in page and "r&amp;&lt;b&gt;" in page
    # the hostile strings themselves never appear raw (the page's own markup may use <b>)
    assert "s<i>x" not in page and "r&<b>" not in page and "<img src=x>" not in page


# --- loopback rendezvous ---------------------------------------------------------------

HANG = """
name: hang
steps: 2
warmup: 1
timeout_s: 120
defaults: {model: tiny, world_size: 2, batch_size: 4, seq_len: 16, fault: hang}
"""


@pytest.mark.parametrize("launcher", ["warm", "torchrun"])
def test_local_rendezvous_listens_only_on_loopback(tmp_path, launcher):
    """Every socket a hung 2-rank cell listens on (the rendezvous store — torchrun's
    agent or the warm launcher's leader — and each rank's gloo pair) is on
    loopback. The hang holds the sockets open; the runner is then SIGKILLed and
    takes the cell with it."""
    cmd = LocalTorchrun().command(Path("p.json"), 2)
    assert "--standalone" not in cmd and "--rdzv-endpoint=127.0.0.1:0" in cmd and "--local-addr=127.0.0.1" in cmd
    (tmp_path / "suite.yaml").write_text(HANG)
    runner = subprocess.Popen(_cli("run", str(tmp_path / "suite.yaml"), "--results", str(tmp_path / "results"),
                                   "--no-progress", "--launcher", launcher),
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listening: dict[tuple[int, str, int], str] = {}  # (pid, ip, port) -> process role
    seen_all_at = None
    deadline = time.time() + 100
    try:
        while time.time() < deadline and (seen_all_at is None or time.time() < seen_all_at + 1.0):
            rank_pids = {int(f.read_text()) for f in (tmp_path / "results").glob("hang/.*/*/rank*.pid") if f.read_text()}
            for p in psutil.Process(runner.pid).children(recursive=True):
                try:
                    role = "rank" if p.pid in rank_pids else "launcher"
                    for conn in p.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            listening[(p.pid, conn.laddr.ip, conn.laddr.port)] = role
                except psutil.Error:
                    pass
            ranks = {pid for (pid, _, _), role in listening.items() if role == "rank"}
            if seen_all_at is None and len(ranks) == 2 and "launcher" in listening.values():
                seen_all_at = time.time()
            time.sleep(0.1)
        family = psutil.Process(runner.pid).children(recursive=True)
    finally:
        runner.kill()
        runner.wait()
    assert seen_all_at is not None, f"the ranks never listened: {listening}"
    exposed = {k: v for k, v in listening.items() if not ipaddress.ip_address(k[1]).is_loopback}
    assert not exposed, f"listening beyond loopback: {exposed}"
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the cell outlived its runner"


def test_cli_matrix_over_the_cap_needs_force(tmp_path):
    sizes = ", ".join(str(i) for i in range(1, 42))
    big = tmp_path / "big.yaml"
    big.write_text(f"name: big\ndefaults: {{adapter: torch, optimizer: onebit_adam}}\nmatrix:\n  seq_len: [{sizes}]\n"
                   "  batch_size: [8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 136, 144, 152, 160, "
                   "168, 176, 184, 192, 200]\n")
    refused = bench("run", str(big), "--results", str(tmp_path / "results"), "--no-progress", check=False)
    assert refused.returncode == 2 and "1025 cells exceed the cap of 1000 (pass --force" in _flat(refused.stderr)
    assert not (tmp_path / "results").exists()
    forced = bench("validate", str(big), "--force")
    assert forced.stdout.startswith("big: 1025 cells")
