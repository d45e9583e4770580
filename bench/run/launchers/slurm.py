"""SLURM launcher: one sbatch script per cell running ``srun torchrun`` on every node.

The script asks for ``nodes`` nodes with one task each; ``srun`` starts one
torchrun agent per node and the agents meet at a c10d rendezvous on the
allocation's first node. The runner's scratch folder (``payload.json``, the
logs, ``result.json``) must be on a filesystem every node sees, as on any
cluster's home or project volume. ``launch`` submits with ``sbatch
--parsable``, polls ``sacct`` (``squeue`` where accounting is off) until the
job ends, cancels it past the cell's ``timeout_s`` counted from its start, and
hands the runner the same outcome a local launch would; the runner then
classifies the cell from its folder as usual. ``dry_run`` writes and prints
the scripts and submits nothing.
"""
from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from bench import REPO
from bench.config.slurm import SlurmSettings
from bench.run.launchers.base import LaunchOutcome, rdzv_id_for, torchrun_args

_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def sbatch_script(settings: SlurmSettings, *, payload: Path, job_name: str, nodes: int, nproc_per_node: int,
                  gpus_per_node: int, timeout_s: float, env: dict[str, str]) -> str:
    """The batch script of one cell (every path absolute; the scratch folder holds the logs)."""
    cell_dir = payload.parent.resolve()
    minutes = math.ceil(timeout_s / 60) + 5
    opts = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1",
            f"--time={settings.time or minutes}", f"--output={cell_dir / 'stdout.log'}", f"--error={cell_dir / 'stderr.log'}"]
    if gpus_per_node:
        opts.append(f"--gpus-per-node={gpus_per_node}")
    for name in ("partition", "account", "cpus_per_task"):
        value = getattr(settings, name)
        if value is not None:
            opts.append(f"--{name.replace('_', '-')}={value}")
    opts += settings.extra_sbatch
    torchrun = Path(sys.executable).parent / "torchrun"
    run = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1",
           str(torchrun) if torchrun.exists() else "torchrun",
           *torchrun_args(nnodes="$SLURM_NNODES", nproc_per_node=nproc_per_node,
                          rdzv_endpoint=f"$head:{settings.rdzv_port}", rdzv_id=rdzv_id_for(payload)),
           "-m", "bench.run.worker", str(payload.resolve())]
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts), "set -euo pipefail", f"cd {shlex.quote(str(REPO))}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    # Threads per rank from the allocation (the submitting host's cores say nothing about it).
    cpus = f"${{SLURM_CPUS_PER_TASK:-{nproc_per_node}}}"
    lines.append(f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( {cpus} / {nproc_per_node} > 0 ? {cpus} / {nproc_per_node} : 1 ))}}")
    lines += settings.setup
    lines.append('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
    # $SLURM_NNODES and $head expand in the script; everything else is quoted.
    lines.append(" ".join(a if a.startswith(("--nnodes=", "--rdzv-endpoint=")) else shlex.quote(a) for a in run))
    return "\n".join(lines) + "\n"


class SlurmLauncher:
    name = "slurm"
    remote = True

    @staticmethod
    def ranks_on_this_host(world_size: int) -> None:
        """The ranks run on the allocated nodes: their threads are SLURM's (cpus_per_task)."""
        return None
    """The ranks run on compute nodes: the runner does not check this host's device."""

    def __init__(self, settings: SlurmSettings, *, nodes: int, nproc_per_node: int | None, dry_run: bool = False,
                 echo: Callable[[str], None] | None = None) -> None:
        self.settings, self.nodes, self.nproc_per_node = settings, nodes, nproc_per_node
        self.dry_run, self.echo = dry_run, echo or print
        if not dry_run:
            missing = [b for b in ("sbatch", "scontrol") if shutil.which(b) is None]
            if missing:
                raise FileNotFoundError(f"launcher = 'slurm': {', '.join(missing)} not found on PATH "
                                        "(run on a SLURM login node, or pass --dry-run to only write the scripts)")

    def script(self, *, payload: Path, world_size: int, timeout_s: float, env: dict[str, str], device: str) -> str:
        nodes = self.nodes
        per_node = self.nproc_per_node if nodes > 1 else world_size
        gpus = self.settings.gpus_per_node
        if gpus is None:
            gpus = per_node if device == "cuda" else 0
        name = f"tb-{payload.parent.name}"
        return sbatch_script(self.settings, payload=payload, job_name=name, nodes=nodes, nproc_per_node=per_node,
                             gpus_per_node=gpus, timeout_s=timeout_s, env=env)

    def launch(self, *, payload: Path, world_size: int, timeout_s: float, env: dict[str, str]) -> LaunchOutcome:
        import json

        device = json.loads(payload.read_text())["knobs"]["device"]
        path = payload.parent / "job.sbatch"
        path.write_text(self.script(payload=payload, world_size=world_size, timeout_s=timeout_s, env=env, device=device))
        out, err = payload.parent / "stdout.log", payload.parent / "stderr.log"
        if self.dry_run:
            self.echo(f"# {path}\n{path.read_text()}")
            return LaunchOutcome(None, False, 0.0, time.time(), out, err)
        submitted = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
        if submitted.returncode != 0:
            err.write_text(f"sbatch failed ({submitted.returncode}): {submitted.stderr}")
            return LaunchOutcome(submitted.returncode, False, 0.0, time.time(), out, err)
        job = submitted.stdout.strip().split(";")[0]
        (payload.parent / "slurm_job_id").write_text(job)
        return self._wait(job, timeout_s, out, err)

    def _wait(self, job: str, timeout_s: float, out: Path, err: Path) -> LaunchOutcome:
        submitted = time.monotonic()
        started: float | None = None
        start_unix = time.time()
        while True:
            state, code = job_state(job)
            if started is None and state not in ("PENDING", "CONFIGURING", "REQUEUED", "UNKNOWN"):
                started, start_unix = time.monotonic(), time.time()
            if state in _DONE:
                break
            late = (started is not None and time.monotonic() - started > timeout_s) or \
                (started is None and time.monotonic() - submitted > self.settings.queue_timeout_s)
            if late:
                subprocess.run(["scancel", job], capture_output=True)
                return LaunchOutcome(None, True, time.monotonic() - (started or submitted), start_unix, out, err)
            time.sleep(self.settings.poll_s)
        wall = time.monotonic() - (started or submitted)
        if state in ("OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "PREEMPTED"):
            with open(err, "a") as fe:  # the runner classifies from the stderr tail
                fe.write(f"\nslurm: job {job} ended {state}{' (out of memory)' if state == 'OUT_OF_MEMORY' else ''}\n")
        return LaunchOutcome(code if state != "COMPLETED" or code else 0, state == "TIMEOUT", wall, start_unix, out, err)


def job_state(job: str) -> tuple[str, int]:
    """(state, exit code) of a job from ``sacct``, or ``squeue`` while
    accounting has no row yet (or is off; a job squeue no longer lists ended)."""
    acct = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State,ExitCode"], capture_output=True, text=True) \
        if shutil.which("sacct") else None
    if acct and acct.returncode == 0 and acct.stdout.strip():
        state, _, code = acct.stdout.strip().splitlines()[0].partition("|")
        return state.split()[0], int(code.split(":")[0] or 0)
    queue = subprocess.run(["squeue", "-j", job, "-h", "-o", "%T"], capture_output=True, text=True)
    state = queue.stdout.strip()
    return (state, 0) if state else ("COMPLETED", 0)
