from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `bench` CLI in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"bench {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def records(results: Path, suite: str) -> list[dict]:
    out = []
    for f in sorted((results / suite).glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def run_suite(tmp_path_factory, text: str) -> list[dict]:
    """Run a suite through the real CLI into a fresh results folder; its records."""
    import yaml

    name = yaml.safe_load(text)["name"]
    tmp = tmp_path_factory.mktemp(name)
    (tmp / "suite.yaml").write_text(text)
    bench("run", str(tmp / "suite.yaml"), "--results", str(tmp / "results"), "--no-progress")
    return records(tmp / "results", name)


@pytest.fixture
def write_suite(tmp_path):
    def write(text: str, name: str = "suite.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def sigkill_runner_when(suite: Path, results: Path, run_id: str, ready, timeout_s: float = 300) -> list:
    """Start `bench run` as a user would, wait until ``ready()`` (or the timeout),
    SIGKILL the runner alone, and wait for its family; returns the family (the
    processes the runner had started), so a test can check none outlived it."""
    import os
    import signal
    import time

    import psutil

    cmd = [sys.executable, "-m", "bench.cli", "run", str(suite), "--results", str(results), "--run-id", run_id,
           "--no-progress"]
    log = results.parent / f"runner-{run_id}.log"  # what the runner said, for a test that finds too little done
    with open(log, "wb") as out:
        runner = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout_s
    while time.time() < deadline and not ready():
        if runner.poll() is not None:
            raise AssertionError(f"bench run exited {runner.returncode} before the kill:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    family = psutil.Process(runner.pid).children(recursive=True)
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    psutil.wait_procs(family, timeout=10)
    return family
