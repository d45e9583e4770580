"""The warm parent of the `warm` local launcher (``python -m bench.run.launchers.forkserver``).

It imports, once per run, what every rank of every cell would import again
(torch, torch.distributed, ``torch._dynamo`` — which the first optimizer
construction pulls in — the harness, and the in-house and torch adapters),
then serves launches one at a time, read as JSON lines on stdin:

    {"payload": …, "world_size": N, "env": {…}, "stdout": …, "stderr": …}

For each launch it forks a *leader* and answers ``{"leader": pid}``, then
``{"returncode": code}`` when the leader has ended. The leader starts a new
session (so the runner can kill the launch — leader and ranks — as one process
group), sends its output to the cell's log files, binds the launch's
rendezvous store to 127.0.0.1 on a fresh port, and forks ``world_size`` rank
processes. Each rank is a **new process** with the environment torchrun gives
its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, and
TORCHELASTIC_USE_AGENT_STORE, so every rank is a client of the leader's store
as torchrun's workers are of the agent's) and runs ``bench.run.worker.main``
unchanged. Nothing is carried from one launch to the next: the parent never
builds a model, a process group or a thread pool, and each launch's ranks are
forked from that clean parent. As torchrun does, the first rank that fails
stops the others (SIGTERM, then SIGKILL) and the leader prints a failure
summary in torchrun's layout, so the runner classifies the cell the same way.

Death with the parent: the server dies with the runner, the leader with the
server, the ranks with the leader (PR_SET_PDEATHSIG at every level), so a
killed runner leaves no process behind.

CUDA: nothing here may initialise CUDA, or a forked rank could not use it.
The server sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (availability checks ask
NVML, not the CUDA driver), imports no framework that probes the device
(DeepSpeed's and Colossal-AI's accelerator detection run in the ranks), and
refuses to serve if ``torch.cuda.is_initialized()`` is true after its imports.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback

from bench.run.launchers.process import LOOPBACK, die_with_parent

GRACE_S = 5.0
"""How long the survivors of a failed rank get between SIGTERM and SIGKILL (torchrun: 30 s)."""


def warm_imports() -> None:
    """What every cell's ranks import, in the order a rank imports it."""
    import numpy  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (the first optimizer construction imports it: ~1.2-1.6 s per rank)
    import torch.distributed  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401
    import torch.utils.checkpoint  # noqa: F401
    # Not torch.distributed.pipelining: importing it leaves a 4-byte tensor alive,
    # which a pipeline cell's CPU live-tensor peak counts when it imports it itself.

    import bench.adapters.inhouse.adapter  # noqa: F401
    import bench.adapters.torch.adapter  # noqa: F401
    import bench.run.worker  # noqa: F401
    from bench.meters import comm, memory, throughput  # noqa: F401

    # The optimizer's lazy imports, on a throw-away parameter (freed again: the
    # CPU live-tensor meter counts from the bytes live when a rank starts tracking).
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.zeros(1)
    torch.optim.AdamW([p]).step()
    del p


def _reply(obj: dict) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def main() -> int:
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's to handle
    start = time.perf_counter()
    warm_imports()
    import torch

    if torch.cuda.is_initialized():
        _reply({"error": "CUDA was initialised while warming up; forked ranks could not use it"})
        return 3
    _reply({"ready": True, "pid": os.getpid(), "warm_s": round(time.perf_counter() - start, 3)})
    for line in sys.stdin:
        request = json.loads(line)
        leader = os.fork()
        if leader == 0:
            code = 1
            try:
                code = _lead(request)
            except BaseException:  # noqa: BLE001 - the leader reports, never returns into the server loop
                traceback.print_exc()
            finally:
                os._exit(code)
        _reply({"leader": leader})
        _, status = os.waitpid(leader, 0)
        _reply({"returncode": os.waitstatus_to_exitcode(status)})
    return 0


def _lead(request: dict) -> int:
    """One launch: a new session, the cell's logs, the rendezvous store, the ranks."""
    os.setsid()
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _redirect(0, os.devnull, os.O_RDONLY)
    _redirect(1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    _redirect(2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))  # a fresh port per launch, loopback only
    sock.listen(128)
    port, world = sock.getsockname()[1], int(request["world_size"])
    env = {**request["env"], "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(world),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
           "TORCHELASTIC_RUN_ID": f"warm-{os.getpid()}"}
    ranks: dict[int, int] = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            sock.close()
            os._exit(_rank(rank, env, request["payload"]))
        ranks[pid] = rank
    import torch.distributed as dist

    # The store the ranks meet at, served on the socket bound above (torch's own
    # server would bind every interface); it lives as long as the launch.
    store = dist.TCPStore(LOOPBACK, port, world, is_master=True, wait_for_workers=False,
                          master_listen_fd=sock.detach())
    failures = _wait(ranks)
    del store
    if not failures:
        return 0
    _summary(failures)
    return 1


def _redirect(fd: int, path: str, flags: int) -> None:
    new = os.open(path, flags, 0o644)
    os.dup2(new, fd)
    os.close(new)


def _rank(rank: int, env: dict[str, str], payload: str) -> int:
    """One rank, in a fresh process: torchrun's worker environment, then the worker."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update({**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_RANK": str(rank)})
        from bench import REPO

        os.chdir(REPO)
        import torch

        # OMP_NUM_THREADS is read when the OpenMP runtime loads, here in the warm
        # parent: apply the cell's value as a torchrun worker would start with it.
        if env.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        from bench.run.worker import main

        code = main([payload])
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _wait(ranks: dict[int, int]) -> list[tuple[int, int, int]]:
    """Wait for every rank; after the first failure, stop the rest (torchrun's rule)."""
    failures: list[tuple[int, int, int]] = []
    deadline = None
    while ranks:
        if deadline is None:
            pid, status = os.wait()
        else:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if time.monotonic() > deadline:
                    for p in ranks:
                        _kill(p, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.05)
                continue
        code = os.waitstatus_to_exitcode(status)
        rank = ranks.pop(pid)
        if code != 0:
            failures.append((rank, pid, code))
            if deadline is None:
                for p in ranks:
                    _kill(p, signal.SIGTERM)
                deadline = time.monotonic() + GRACE_S
    return failures


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _summary(failures: list[tuple[int, int, int]]) -> None:
    """torchrun's failure summary layout (``rank : R`` then ``exitcode : -N … (SIGNAME)``)."""
    lines = ["=" * 60, "bench.run.launchers.forkserver FAILED", "-" * 60, "Failures:"]
    for i, (rank, pid, code) in enumerate(failures):
        sig = f" ({signal.Signals(-code).name})" if code < 0 and -code in signal.Signals._value2member_map_ else ""
        lines += [f"[{i}]:", f"  rank      : {rank} (local_rank: {rank})", f"  exitcode  : {code} (pid: {pid}){sig}"]
    lines.append("=" * 60)
    print("\n".join(lines), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
