"""The launcher protocol the runner sees, and the torchrun arguments every
launcher (local, multi-node, SLURM) shares."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


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

    def ranks_on_this_host(self, world_size: int) -> int | None:
        """Ranks of a ``world_size`` cell this host runs (None: they run elsewhere)."""


def torchrun_args(*, nnodes: int | str, nproc_per_node: int | str, rdzv_endpoint: str, rdzv_id: str) -> list[str]:
    """The multi-node part of a torchrun command line, shared by every launcher
    (torchrun ignores ``--node-rank`` with c10d: the rendezvous assigns ranks)."""
    return [f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]


def rdzv_id_for(payload: Path) -> str:
    """Every node derives the same rendezvous id for a cell: run id + cell id
    (the scratch folder is ``.<run-id>/<cell-id>/payload.json``)."""
    return f"{payload.parent.parent.name.lstrip('.')}-{payload.parent.name}"


def check_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rdzv_endpoint = {endpoint!r}: expected HOST:PORT with a port in 1..65535")
    return host, int(port)
