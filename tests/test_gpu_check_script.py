"""scripts/gpu_check.sh fails when what it checks fails (#23): with stand-in
`python` and `bench` executables, a failing GPU pytest or `bench run` still lets
the report and summary run, and then the script exits 1 naming the step."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

STUB_PYTHON = """#!/usr/bin/env bash
# "-m pytest": exit PYTEST_RC; "-c": print the suite name; a heredoc ("-" or none): succeed.
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then exit "${PYTEST_RC:-0}"; fi
if [ "$1" = "-c" ]; then echo gpu-1x; exit 0; fi
cat > /dev/null; exit 0
"""
STUB_BENCH = """#!/usr/bin/env bash
if [ "$1" = "run" ]; then exit "${RUN_RC:-0}"; fi
exit 0
"""


def _check(tmp_path: Path, **rc: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python", STUB_PYTHON), ("bench", STUB_BENCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "BIN": str(bin_dir), "OUT": str(tmp_path / "out"), **rc}
    return subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_passes_when_every_step_passes(tmp_path):
    proc = _check(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "GPU check passed" in proc.stdout


@pytest.mark.parametrize("rc, step", [({"PYTEST_RC": "3"}, "pytest -m gpu (exit 3)"),
                                      ({"RUN_RC": "2"}, "bench run (exit 2")])
def test_fails_when_a_step_fails(tmp_path, rc, step):
    proc = _check(tmp_path, **rc)
    assert proc.returncode == 1
    assert f"GPU check FAILED: {step}" in proc.stderr


def test_fails_without_a_gpu_on_this_machine(tmp_path):
    """The real interpreter: its CUDA assertion stops the check at once on a CPU machine."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stderr
