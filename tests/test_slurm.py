"""SLURM launcher: `bench run --launcher slurm --dry-run` writes one sbatch
script per cell running `srun torchrun` over the cell's nodes, submits nothing
and records nothing; without `sbatch` a real run stops before launching."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config.suite import SuiteError, parse_suite
from tests.conftest import ROOT

SUITE = """
name: slurm2
steps: 3
warmup: 1
timeout_s: 1500
launcher: slurm
nodes: 2
nproc_per_node: 4
slurm:
  partition: gpu
  account: proj-7
  gpus_per_node: 4
  cpus_per_task: 16
  rdzv_port: 29511
  setup: ["module load cuda/12.4"]
  extra_sbatch: [--exclusive, --mem=0]
defaults: {model: tiny, device: cuda, world_size: 8, batch_size: 8}
matrix:
  zero: [0, 3]
"""


def _cli(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path} if path is not None else None
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    (tmp / "s.yaml").write_text(SUITE)
    # A PATH holding sbatch that would leave a trace if anything submitted.
    trap = tmp / "bin"
    trap.mkdir()
    for name in ("sbatch", "srun", "scontrol", "sacct", "squeue"):
        (trap / name).write_text(f"#!/bin/sh\necho {name} >> {tmp / 'submitted'}\n")
        (trap / name).chmod(0o755)
    proc = _cli("run", str(tmp / "s.yaml"), "--results", str(tmp / "results"), "--no-progress", "--dry-run",
                "--run-id", "dry1", path=f"{trap}:{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stderr
    return tmp, proc


def _parse(script: str) -> tuple[dict[str, str], list[str], list[str]]:
    sbatch: dict[str, str] = {}
    body = []
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").partition("=")
            sbatch[key] = value
        elif line and not line.startswith("#"):
            body.append(line)
    srun = next(shlex.split(line) for line in body if line.startswith("srun "))
    return sbatch, body, srun


def test_one_script_per_cell_with_the_right_sbatch_lines(dry_run) -> None:
    tmp, proc = dry_run
    scripts = sorted((tmp / "results" / "slurm2" / ".dry1").glob("*/job.sbatch"))
    assert len(scripts) == 2
    for path in scripts:
        text = path.read_text()
        assert text in proc.stdout  # printed as well as written
        sbatch, body, _ = _parse(text)
        cell_dir = path.parent.resolve()
        assert sbatch == {
            "--job-name": f"tb-{cell_dir.name}", "--nodes": "2", "--ntasks-per-node": "1",
            "--time": str(1500 // 60 + 5), "--output": str(cell_dir / "stdout.log"), "--error": str(cell_dir / "stderr.log"),
            "--gpus-per-node": "4", "--partition": "gpu", "--account": "proj-7", "--cpus-per-task": "16",
            "--exclusive": "", "--mem": "0",
        }
        assert text.startswith("#!/bin/bash\n")
        assert "module load cuda/12.4" in body
        assert body.index("module load cuda/12.4") < next(i for i, l in enumerate(body) if l.startswith("srun"))
        assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in body


def test_srun_runs_torchrun_over_the_nodes(dry_run) -> None:
    tmp, _ = dry_run
    for path in sorted((tmp / "results" / "slurm2" / ".dry1").glob("*/job.sbatch")):
        _, _, srun = _parse(path.read_text())
        i = next(i for i, a in enumerate(srun) if Path(a).name == "torchrun")
        assert srun[0] == "srun" and "--ntasks-per-node=1" in srun[1:i]
        args = dict(a.split("=", 1) for a in srun[i + 1:] if a.startswith("--"))
        assert args == {"--nnodes": "$SLURM_NNODES", "--nproc-per-node": "4", "--rdzv-backend": "c10d",
                        "--rdzv-endpoint": "$head:29511", "--rdzv-id": f"dry1-{path.parent.name}"}
        payload = Path(srun[-1])
        assert srun[-3:-1] == ["-m", "bench.run.worker"] and payload == path.parent.resolve() / "payload.json"
        assert payload.exists()


def test_scripts_are_valid_bash(dry_run) -> None:
    tmp, _ = dry_run
    for path in (tmp / "results" / "slurm2" / ".dry1").glob("*/job.sbatch"):
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_dry_run_submits_and_records_nothing(dry_run) -> None:
    tmp, proc = dry_run
    assert not (tmp / "submitted").exists()
    assert not list((tmp / "results").rglob("*.jsonl"))
    assert not list((tmp / "results").rglob("result.json"))
    assert "nothing submitted, no record written" in proc.stdout


def test_missing_sbatch_fails_before_anything_launches(tmp_path) -> None:
    (tmp_path / "s.yaml").write_text(SUITE)
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = _cli("run", str(tmp_path / "s.yaml"), "--results", str(tmp_path / "results"), "--no-progress", path=str(empty))
    assert proc.returncode == 2
    assert "launcher = 'slurm': sbatch, scontrol not found on PATH" in proc.stderr
    assert not list((tmp_path / "results").rglob("*.jsonl")) and not list((tmp_path / "results").rglob("payload.json"))


def test_dry_run_needs_the_slurm_launcher(tmp_path) -> None:
    (tmp_path / "s.yaml").write_text("name: loc\ndefaults: {world_size: 1}\n")
    proc = _cli("run", str(tmp_path / "s.yaml"), "--results", str(tmp_path / "results"), "--dry-run")
    assert proc.returncode == 2 and "--dry-run writes sbatch scripts: it needs launcher = 'slurm'" in proc.stderr


@pytest.mark.parametrize("text,fragment", [
    ("slurm: {time: soon}\n", "slurm.time = 'soon'"),
    ("slurm: {partiton: gpu}\n", "slurm.partiton"),
    ("slurm: {extra_sbatch: ['--mem 0']}\n", "slurm.extra_sbatch[0] = '--mem 0': write one option as --name=value"),
    ("slurm: {gpus_per_node: -1}\n", "slurm.gpus_per_node = -1"),
    ("slurm: {account: 'a;rm -rf /'}\n", "slurm.account"),
])
def test_slurm_settings_are_validated(text: str, fragment: str) -> None:
    with pytest.raises(SuiteError) as info:
        parse_suite("name: x\nlauncher: slurm\n" + text)
    assert fragment in str(info.value), str(info.value)
