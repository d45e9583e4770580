"""Launchers: how one cell's ranks are started. The runner sees only ``Launcher``.

``LocalTorchrun`` runs torchrun (one node, c10d rendezvous on 127.0.0.1) in a
new session, so a timeout can kill the agent and every rank as one process
group; ranks also die with their agent (PR_SET_PDEATHSIG, set in the worker).
Multi-node torchrun and SLURM come later behind the same interface.

Nothing a local cell starts listens beyond loopback: ``torchrun --standalone``
hosts its TCPStores on every interface (``::``, whatever the host name says),
so torchrun is started through this module (``python -m bench.launch``), which
hands each store server a socket already bound to 127.0.0.1; gloo and NCCL
are pointed at the loopback interface.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
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
        # A short grace for SIGTERM: a hung cell must be reported within timeout + 5 s.
        _, alive = psutil.wait_procs(family, timeout=2 if sig == signal.SIGTERM else 5)
        if not alive:
            break
    proc.wait()


LOOPBACK = "127.0.0.1"


def loopback_interface() -> str:
    """Name of the interface holding 127.0.0.1 (``lo`` on Linux)."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == LOOPBACK for a in addrs):
            return name
    return "lo"


class LocalTorchrun:
    name = "local"

    def command(self, payload: Path, world_size: int) -> list[str]:
        # What --standalone sets, with the endpoint and this node's address
        # spelled as 127.0.0.1 (the workers' MASTER_ADDR is --local-addr).
        return [
            sys.executable, "-m", "bench.launch",
            "--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={LOOPBACK}:0", f"--rdzv-id={uuid.uuid4()}",
            f"--local-addr={LOOPBACK}", f"--nproc_per_node={world_size}",
            "-m", "bench.worker", str(payload),
        ]

    @staticmethod
    def network_env() -> dict[str, str]:
        """gloo binds the host name's address and NCCL's bootstrap a non-loopback
        interface unless told otherwise; a setting the user made wins."""
        lo = loopback_interface()
        return {k: v for k, v in {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo}.items() if k not in os.environ}

    def launch(self, *, payload: Path, world_size: int, timeout_s: float, env: dict[str, str]) -> LaunchOutcome:
        out, err = payload.parent / "stdout.log", payload.parent / "stderr.log"
        start, start_unix = time.perf_counter(), time.time()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                self.command(payload, world_size),
                stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.network_env(), **env}, start_new_session=True, preexec_fn=_pdeathsig,
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
