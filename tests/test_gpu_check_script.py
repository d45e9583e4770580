"""scripts/gpu_check.sh, the prepared device check (#23, #24): its CPU dry run
goes through every step (preflight, the suite through the harness, the report,
the gpu tests collected, the summary), packs at most four files, and exits 1
naming a planted failing cell; on this machine a CUDA check stops at the
preflight; the offline wheelhouse builds within the device tool's limit."""
from __future__ import annotations

import os
import subprocess
import tarfile

import pytest

from tests.conftest import ROOT

PLANTED = """name: dry
steps: 2
warmup: 1
defaults: {model: tiny, device: cuda, world_size: 2, batch_size: 8, seq_len: 32}
include:
  - {adapter: inhouse}
  - {adapter: torch, fault: raise}
  - {adapter: colossalai, zero: 1, precision: bf16}
"""


def _check(tmp_path, suite: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", suite], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OUT": str(tmp_path / "out"), **env})


def test_dry_run_goes_end_to_end_and_fails_on_a_planted_failure(tmp_path):
    suite = ROOT / "suites" / f"_dry_{os.getpid()}.yaml"  # the check takes a suite path inside the repository
    suite.write_text(PLANTED)
    try:
        proc = _check(tmp_path, str(suite.relative_to(ROOT)), DEVICE="cpu")
    finally:
        suite.unlink()
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GPU check FAILED: cell" in proc.stderr and "injected fault: raise" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["artifacts.tar.gz", "check.log", "results.jsonl", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "ok / not ok per adapter: colossalai 0/1, inhouse 1/0, torch 0/1" in summary
    assert "best in-house MFU" in summary
    log = (out / "check.log").read_text()
    for step in ("import deepspeed: ok", "estimated time of", "== bench run", "== bench report: exit 0",
                 "pytest -m gpu (collect only): exit 0"):
        assert step in log, step
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        assert any(n.endswith("index.html") for n in tar.getnames())
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


def test_cuda_check_stops_at_the_preflight_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _check(tmp_path, "suites/gpu-smoke.yaml")
    assert proc.returncode == 1
    assert "no CUDA device" in proc.stderr
    assert (tmp_path / "out" / "summary.txt").exists()


def test_wheelhouse_builds_within_the_device_tools_limit(tmp_path):
    """The wheels the lent machine's image lacks (cp312 manylinux or pure), fetched
    from PyPI and built here; the device tool carries 64 MiB with the repository."""
    proc = subprocess.run(["bash", "scripts/build_wheelhouse.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "DEST": str(tmp_path / "whl")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name.split("-")[0].lower() for p in (tmp_path / "whl").iterdir()}
    assert {"pydantic", "pydantic_core", "deepspeed", "colossalai", "megatron_core", "hjson", "contexttimer"} <= names
    size = sum(p.stat().st_size for p in (tmp_path / "whl").iterdir())
    assert size < 56 * 2**20, size
