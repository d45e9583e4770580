"""Which launcher the run settings ask for."""
from __future__ import annotations

from typing import Any

from bench.run.launchers.base import Launcher
from bench.run.launchers.torchrun import LocalTorchrun, MultiNodeTorchrun
from bench.run.launchers.warm import WarmLocal


def make_launcher(run: Any, *, node_rank: int = 0, simulate_nodes: bool = False, dry_run: bool = False,
                  echo: Any = None) -> Launcher:
    """The launcher the run settings ask for (``launcher``, ``nodes``,
    ``nproc_per_node``, ``rdzv_endpoint``, ``slurm``)."""
    if run.launcher == "slurm":
        from bench.run.launchers.slurm import SlurmLauncher

        return SlurmLauncher(run.slurm, nodes=run.nodes, nproc_per_node=run.nproc_per_node, dry_run=dry_run, echo=echo)
    if dry_run:
        raise ValueError("--dry-run writes sbatch scripts: it needs launcher = 'slurm'")
    if run.nodes == 1:
        if simulate_nodes or node_rank:
            raise ValueError("--simulate-nodes and --node-rank need nodes >= 2 in the run settings")
        return LocalTorchrun() if run.launcher == "torchrun" else WarmLocal()
    ranks = tuple(range(run.nodes)) if simulate_nodes else (node_rank,)
    return MultiNodeTorchrun(run.nodes, run.nproc_per_node, run.rdzv_endpoint, ranks)
