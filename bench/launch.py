"""Launchers: how one cell's ranks are started. The runner sees only ``Launcher``.

``LocalTorchrun`` runs ``torchrun --standalone`` (rendezvous on localhost) in a
new session, so a timeout can kill the agent and every rank as one process
group; ranks also die with their agent (PR_SET_PDEATHSIG, set in the worker).
Multi-node torchrun and SLURM come later behind the same interface.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil


@dataclass(frozen=True, slots=True)
class LaunchOutcome:
    returncode: int | None
    timed_out: bool
    wall_s: float
    start_unix: float
    stdout_path: Path
    stderr_path: Path


class Launcher(Protocol):
    name: str

    def launch(self, *, payload: Path, world_size: int, timeout_s: float, env: dict[str, str]) -> LaunchOutcome: ...


def _pdeathsig() -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except OSError:
        pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the whole session: agent, ranks and anything they forked."""
    try:
        agent = psutil.Process(proc.pid)
        family = [agent, *agent.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for p in family:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=3)
        if not alive:
            break
    proc.wait()


class LocalTorchrun:
    name = "local"

    def command(self, payload: Path, world_size: int) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nproc_per_node={world_size}",
            "-m", "bench.worker", str(payload),
        ]

    def launch(self, *, payload: Path, world_size: int, timeout_s: float, env: dict[str, str]) -> LaunchOutcome:
        out, err = payload.parent / "stdout.log", payload.parent / "stderr.log"
        start, start_unix = time.perf_counter(), time.time()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                self.command(payload, world_size),
                stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                env={**os.environ, **env}, start_new_session=True, preexec_fn=_pdeathsig,
                cwd=Path(__file__).resolve().parent.parent,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_tree(proc)
            except BaseException:
                kill_tree(proc)  # Ctrl-C: leave nothing behind
                raise
        return LaunchOutcome(proc.returncode, timed_out, time.perf_counter() - start, start_unix, out, err)
