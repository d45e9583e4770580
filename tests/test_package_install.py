"""TrainBench as a package (#23): `pip install .` (here into a folder of its own,
without the dependencies this environment already has), then `bench run` and
`bench report` from an unrelated directory: the code, templates and presets
come from the installed package, results and reports land under the user's
directory, and nothing is written into the package."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

SUITE = """
name: pkg
steps: 2
warmup: 1
defaults: {model: tiny, world_size: 1, batch_size: 4, seq_len: 32}
"""


def _files(root):
    return {p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_installed_package_runs_from_any_directory(tmp_path):
    target, user = tmp_path / "site", tmp_path / "user"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    installed = _files(target)
    user.mkdir()
    (user / "suite.yaml").write_text(SUITE)
    env = {**os.environ, "PYTHONPATH": str(target)}

    def bench(*args):
        proc = subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=user, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    where = subprocess.run([sys.executable, "-c", "import bench, impl; print(bench.__file__, impl.__file__)"],
                           cwd=user, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(target)) for path in where), where
    assert "ok" in bench("run", "suite.yaml", "--no-progress")
    (run,) = (user / "results" / "pkg").glob("*.jsonl")
    out = bench("report", str(run))
    (page,) = (user / "reports" / "pkg").glob("*/index.html")  # the packaged template rendered it
    assert "TrainBench" in page.read_text() and "report:" in out
    assert _files(target) == installed  # nothing written into the installed package
