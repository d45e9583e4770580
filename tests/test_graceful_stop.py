"""Ctrl-C or a scheduler's SIGTERM during `bench run` (#27): launching stops,
the running cell's process group is killed, nothing partial is recorded, the
`--resume` command is printed, and the resume finishes the suite; a second
signal exits at once."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, bench, records

SUITE = """
name: stop
steps: 2
warmup: 1
timeout_s: 120
defaults: {model: tiny, world_size: 2, batch_size: 4, seq_len: 16}
matrix:
  fault: [none, hang]
"""


def _ok_first(prefix: str) -> str:
    """A run id whose seeded launch order runs the ok cell before the hanging one."""
    from bench.config.suite import parse_suite
    from bench.run.schedule import interleaved

    suite, cells = parse_suite(SUITE)
    first = next(c.id for c in cells if c.knobs.fault == "none")
    return next(f"{prefix}{i}" for i in range(100)
                if interleaved([c.id for c in cells], 1, f"{suite.seed}:{prefix}{i}")[0][0] == first)


def _start(tmp_path, prefix: str) -> tuple[subprocess.Popen, object, str]:
    (tmp_path / "suite.yaml").write_text(SUITE)
    results = tmp_path / "results"
    run_id = _ok_first(prefix)
    cmd = [sys.executable, "-m", "bench.cli", "run", str(tmp_path / "suite.yaml"), "--results", str(results),
           "--run-id", run_id, "--no-progress"]
    runner = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_file = results / "stop" / f"{run_id}.jsonl"
    deadline = time.time() + 120
    # Ready: the ok cell is recorded, and the hanging cell's launch has begun (its log files exist).
    while time.time() < deadline:
        if (run_file.exists() and run_file.read_text().count("\n") == 1
                and any((results / "stop" / f".{run_id}").glob("*/stderr.log"))
                and len(list((results / "stop" / f".{run_id}").glob("*/stderr.log"))) == 2):
            break
        time.sleep(0.2)
    else:
        runner.kill()
        pytest.fail("the hanging cell never started")
    time.sleep(3.0)  # its ranks are up and the hang is under way
    return runner, run_file, run_id


def test_one_signal_stops_cleanly_and_prints_the_resume(tmp_path):
    """SIGTERM, as a scheduler sends it (Ctrl-C's SIGINT takes the same handler: the next test)."""
    sig = signal.SIGTERM
    runner, run_file, run_id = _start(tmp_path, "interrupted")
    family = psutil.Process(runner.pid).children(recursive=True)
    start = time.monotonic()
    runner.send_signal(sig)
    out, err = runner.communicate(timeout=60)
    took = time.monotonic() - start
    assert runner.returncode == 128 + sig, (runner.returncode, err)
    assert took < 20, took  # not the 120 s timeout: the hang was killed
    assert f"stopped by {signal.Signals(sig).name}" in err
    assert f"--resume {run_id}" in err
    psutil.wait_procs(family, timeout=10)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "orphans after the stop"
    lines = run_file.read_text().splitlines()
    assert [json.loads(line)["config"]["fault"] for line in lines] == ["none"]  # whole, and nothing partial
    # The printed command finishes the suite (the hang is now recorded as a timeout).
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(SUITE.replace("timeout_s: 120", "timeout_s: 10"))
    bench("run", str(suite_path), "--results", str(tmp_path / "results"), "--resume", run_id, "--no-progress",
          timeout=120)
    statuses = sorted(r["status"] for r in records(tmp_path / "results", "stop"))
    assert statuses == ["ok", "timeout"]


def test_second_signal_exits_at_once(tmp_path):
    """Ctrl-C twice: the first SIGINT starts the clean stop, the second ends the runner at once."""
    runner, run_file, _ = _start(tmp_path, "twice")
    family = psutil.Process(runner.pid).children(recursive=True)
    start = time.monotonic()
    runner.send_signal(signal.SIGINT)
    time.sleep(0.3)  # the clean stop is under way (killing the hanging cell's process group)
    runner.send_signal(signal.SIGINT)
    _, err = runner.communicate(timeout=30)
    assert runner.returncode in (128 + signal.SIGINT, -signal.SIGINT), runner.returncode
    assert "continue with" not in err  # it did not finish the clean stop: it left at once
    assert time.monotonic() - start < 5
    psutil.wait_procs(family, timeout=10)  # ranks die with their parent (PR_SET_PDEATHSIG)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "orphans"
    assert [json.loads(line)["config"]["fault"] for line in run_file.read_text().splitlines()] == ["none"]
