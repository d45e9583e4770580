"""Launchers: how one cell's ranks are started. The runner sees only ``Launcher``.

``LocalTorchrun`` runs torchrun (one node, c10d rendezvous on 127.0.0.1) in a
new session, so a timeout can kill the agent and every rank as one process
group; ranks also die with their agent (PR_SET_PDEATHSIG, set in the worker).
``MultiNodeTorchrun`` runs this node's agent of a cell that spans ``nnodes``
nodes meeting at one c10d rendezvous endpoint (or, to simulate a cluster, every
node's agent on this host). SLURM (``bench.run.launchers.slurm``) submits the same torchrun
command through ``sbatch``/``srun``. ``make_launcher`` picks one from the run
settings.

Nothing a local cell starts listens beyond loopback: ``torchrun --standalone``
hosts its TCPStores on every interface (``::``, whatever the host name says),
so torchrun is started through this module (``python -m bench.run.launchers.torchrun``), which
hands each store server a socket already bound to 127.0.0.1; gloo and NCCL
are pointed at the loopback interface.
"""
from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.run.launchers.base import LaunchOutcome, check_endpoint, rdzv_id_for, torchrun_args
from bench.run.launchers.process import LOOPBACK, loopback_interface, run_agents


class LocalTorchrun:
    name = "torchrun"

    def ranks_on_this_host(self, world_size: int) -> int:
        return world_size

    def command(self, payload: Path, world_size: int) -> list[str]:
        # What --standalone sets, with the endpoint and this node's address
        # spelled as 127.0.0.1 (the workers' MASTER_ADDR is --local-addr).
        return [
            sys.executable, "-m", "bench.run.launchers.torchrun",
            "--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={LOOPBACK}:0", f"--rdzv-id={uuid.uuid4()}",
            f"--local-addr={LOOPBACK}", f"--nproc_per_node={world_size}",
            "-m", "bench.run.worker", str(payload),
        ]

    @staticmethod
    def network_env() -> dict[str, str]:
        """gloo binds the host name's address and NCCL's bootstrap a non-loopback
        interface unless told otherwise; a setting the user made wins."""
        lo = loopback_interface()
        return {k: v for k, v in {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo}.items() if k not in os.environ}

    def launch(self, *, payload: Path, world_size: int, timeout_s: float, env: dict[str, str]) -> LaunchOutcome:
        return run_agents([self.command(payload, world_size)], payload.parent, timeout_s, {**self.network_env(), **env})


@dataclass(frozen=True, slots=True)
class MultiNodeTorchrun:
    """One cell over ``nnodes`` × ``nproc_per_node`` ranks: this host starts the
    agents of ``node_ranks`` (a cluster node: its own rank; a simulation: every
    rank, all on this host) and they meet the other nodes' agents at the c10d
    rendezvous on ``rdzv_endpoint``. The worker takes its device from
    LOCAL_RANK and everything else from the global RANK. Each node's local
    rank 0 writes the (gathered, identical) record into its own scratch folder,
    so the node running the recorder has it whichever node got global rank 0."""

    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: str
    node_ranks: tuple[int, ...] = (0,)
    name: str = "multinode"

    def __post_init__(self) -> None:
        if self.nnodes < 2:
            raise ValueError(f"nodes = {self.nnodes}: a multi-node launch needs nodes >= 2")
        bad = [r for r in self.node_ranks if not 0 <= r < self.nnodes]
        if bad or not self.node_ranks:
            raise ValueError(f"node_rank = {bad or list(self.node_ranks)} is outside 0..{self.nnodes - 1} (nodes = {self.nnodes})")
        check_endpoint(self.rdzv_endpoint)

    @property
    def simulated(self) -> bool:
        return len(self.node_ranks) > 1

    def ranks_on_this_host(self, world_size: int) -> int:
        return self.nproc_per_node * len(self.node_ranks)

    def command(self, payload: Path, node_rank: int) -> list[str]:
        cmd = [sys.executable, "-m", "bench.run.launchers.torchrun",
               *torchrun_args(nnodes=self.nnodes, nproc_per_node=self.nproc_per_node,
                              rdzv_endpoint=self.rdzv_endpoint, rdzv_id=rdzv_id_for(payload))]
        # No --node-rank: with c10d the rendezvous assigns node ranks (torchrun ignores it).
        if self.simulated:
            # Every agent has the endpoint's address: say which one hosts the store.
            cmd += [f"--rdzv-conf=is_host={int(node_rank == 0)}", f"--local-addr={LOOPBACK}"]
        return [*cmd, "-m", "bench.run.worker", str(payload)]

    def launch(self, *, payload: Path, world_size: int, timeout_s: float, env: dict[str, str]) -> LaunchOutcome:
        if world_size != self.nnodes * self.nproc_per_node:
            raise ValueError(f"world_size = {world_size} but nodes × nproc_per_node = {self.nnodes} × {self.nproc_per_node}")
        net = LocalTorchrun.network_env() if self.rdzv_endpoint.rsplit(":", 1)[0] in (LOOPBACK, "localhost") else {}
        return run_agents([self.command(payload, r) for r in self.node_ranks], payload.parent, timeout_s, {**net, **env})


def _serve_stores_on_loopback() -> None:
    """Make every TCPStore server this process hosts for a loopback address
    listen on 127.0.0.1 only, through TCPStore's ``master_listen_fd``
    (torch's own server binds the wildcard address)."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    class LoopbackTCPStore(dist.TCPStore):
        def __init__(self, host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
                     timeout: timedelta = timedelta(seconds=300), wait_for_workers: bool = True,
                     multi_tenant: bool = False, master_listen_fd: int | None = None, use_libuv: bool = True) -> None:
            if is_master and master_listen_fd is None and host_name in ("localhost", LOOPBACK):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.bind((LOOPBACK, port))
                    sock.listen(128)
                except OSError:
                    sock.close()
                    raise
                port = sock.getsockname()[1]
                master_listen_fd = sock.detach()  # the store owns the socket from here
            super().__init__(host_name, port, world_size, is_master, timeout, wait_for_workers, multi_tenant,
                             master_listen_fd, use_libuv)

    dist.TCPStore = LoopbackTCPStore
    c10d_rendezvous_backend.TCPStore = LoopbackTCPStore


if __name__ == "__main__":
    _serve_stores_on_loopback()
    from torch.distributed.run import main

    main()
