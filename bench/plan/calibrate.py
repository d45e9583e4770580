"""Short micro-benchmarks that calibrate a ``MachineProfile`` on this machine.

* matmul throughput: fp32 (rows × width) @ (width × width) on a grid of
  shapes, in one process using every core and in N concurrent ranks (cores ÷ N
  threads each, as training runs them);
* streaming memory bandwidth (the optimizer step), and the fixed cost of a
  small autograd op (framework overhead, which dominates tiny models);
* collectives under torchrun (gloo on CPU, nccl on GPU): all-reduce,
  all-gather, reduce-scatter and a send/recv pair at three sizes per group
  size; α and β of t = α + bus_bytes/β fitted by least squares, bus bytes as
  in DESIGN.md (all-reduce 2(n−1)/n, all-gather/reduce-scatter (n−1)/n, p2p 1).

About 30–60 s on a 2-core box. Run as ``python -m bench.plan.calibrate
OUT.json`` (this module relaunches itself under torchrun for the collectives).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.plan.machine import MachineProfile

MATMUL_ROWS = (64, 256, 1024, 4096)
MATMUL_WIDTHS = (64, 256, 1024)
COMM_SIZES_BYTES = (2**12, 2**16, 2**19, 2**21, 2**22)
COMM_ROUNDS = 3
COMM_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "p2p")


def _timed(fn, *, seconds: float, min_reps: int = 2, rounds: int = 3) -> float:
    """Seconds per call: the fastest of ``rounds`` rounds (each ≥ ``min_reps``
    calls and ≥ seconds/rounds), after one warm-up call — the machine is shared,
    and interference only ever slows a round down."""
    fn()
    best = math.inf
    for _ in range(rounds):
        reps, start = 0, time.perf_counter()
        while reps < min_reps or time.perf_counter() - start < seconds / rounds:
            fn()
            reps += 1
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def matmul_grid(threads: int, ranks: int = 1, seconds: float = 0.04) -> dict[str, float]:
    """FLOP/s keyed "ranks:rows:width": measured in each of ``ranks`` concurrent
    processes (the comm worker) with ``threads`` threads each, as ranks run."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        for w in MATMUL_WIDTHS:
            b = torch.randn(w, w)
            for r in MATMUL_ROWS:
                a = torch.randn(r, w)
                t = _timed(lambda: a @ b, seconds=seconds)
                out[f"{ranks}:{r}:{w}"] = 2 * r * w * w / t
    finally:
        torch.set_num_threads(old)
    return out


def memory_bandwidth(n_bytes: int = 2**26) -> float:
    """Bytes moved per second by an in-place add of two fp32 tensors (read 2, write 1)."""
    import torch

    a, b = torch.zeros(n_bytes // 4), torch.ones(n_bytes // 4)
    return 3 * n_bytes / _timed(lambda: a.add_(b), seconds=0.2)


def op_overhead(n_ops: int = 64) -> float:
    """Seconds per op of a chain of tiny autograd ops, forward + backward."""
    import torch

    x = torch.ones(4, 4, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(n_ops):
            y = y * 1.0001
        y.sum().backward()

    # forward + backward node per op: the overhead of one (op, grad-op) pair
    return _timed(chain, seconds=0.2) / n_ops


def fit_alpha_beta(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least squares of t = α + x/β over (bus_bytes, seconds) points, each
    residual relative to its t (weights 1/t²), so the latency-bound small
    sizes fix α as firmly as the large ones fix β; α ≥ 0."""
    w = [1 / (y * y) for _, y in points]
    sw = sum(w)
    mx = sum(wi * x for wi, (x, _) in zip(w, points)) / sw
    my = sum(wi * y for wi, (_, y) in zip(w, points)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, (x, _) in zip(w, points))
    slope = sum(wi * (x - mx) * (y - my) for wi, (x, y) in zip(w, points)) / sxx
    slope = max(slope, 1e-15)
    alpha = my - slope * mx
    if alpha < 0:  # refit through the origin
        alpha = 0.0
        slope = sum(wi * x * y for wi, (x, y) in zip(w, points)) / sum(wi * x * x for wi, (x, _) in zip(w, points))
    return {"alpha_s": alpha, "beta_bytes_per_s": 1 / slope}


def overlap_fraction(*, comm_bytes: int = 2**25, repeats: int = 7) -> float:
    """Under a process group: the share of an asynchronous all-reduce that hides
    behind compute started beside it, (t_compute + t_comm − t_both) ÷ min(t_compute, t_comm),
    clamped to [0, 1], median of ``repeats`` (one try varies ±0.5 on 2 shared
    cores). On a GPU the collective runs on its own stream and SMs; on a CPU
    gloo's copies and sums need the cores the compute threads hold, so part of
    it adds to the step (DDP/ZeRO's bucket overlap): 0.3–0.4 measured here."""
    import statistics

    import torch
    import torch.distributed as dist

    buf = torch.zeros(comm_bytes // 4)
    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def comm() -> None:
        dist.all_reduce(buf, async_op=True).wait()

    def timed(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    comm()
    t_comm = statistics.median(timed(comm) for _ in range(3))
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    reps = max(1, round(10 * t_comm / (time.perf_counter() - start)))  # compute about as long as the collective

    def compute() -> None:
        for _ in range(reps):
            a @ b

    def both() -> None:
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()

    fractions = []
    for _ in range(repeats):
        tc, ta, tb = timed(compute), timed(comm), timed(both)
        fractions.append((tc + ta - tb) / min(tc, ta))
    return min(1.0, max(0.0, statistics.median(fractions)))


def blocking_extra(*, comm_bytes: int = 2**18, calls: int = 20, repeats: int = 11) -> float:
    """Under a process group: seconds a blocking all-reduce costs beyond its
    α–β time when it sits between compute, as TP's and a pipeline's collectives
    do: (t(compute; all-reduce) − t(compute) − t(all-reduce)) per call, median of
    ``repeats``. Ranks reach each call at slightly different times (their compute
    jitters), and the earlier one waits: about 1 ms per call on 2 shared CPU
    cores, where an idle-ranks α–β misses it."""
    import statistics

    import torch
    import torch.distributed as dist

    buf = torch.zeros(comm_bytes // 4)
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def compute() -> None:
        for _ in range(8):
            a @ b

    def loop(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        dist.barrier()
        return time.perf_counter() - start

    def both() -> None:
        compute()
        dist.all_reduce(buf)

    loop(both)
    extras = []
    for _ in range(repeats):
        tc, ta, tb = loop(compute), loop(lambda: dist.all_reduce(buf)), loop(both)
        extras.append((tb - tc - ta) / calls)
    return max(0.0, statistics.median(extras))


def _comm_worker(out_path: str) -> None:
    """Under torchrun: time each collective at each size; rank 0 writes (bus_bytes, s) points."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    dist.barrier()
    grid = matmul_grid(max(1, (os.cpu_count() or 1) // n), ranks=n)  # every rank at once, as in training
    points: dict[str, list[tuple[float, float]]] = {k: [] for k in COMM_KINDS}
    for size in COMM_SIZES_BYTES:
        elems = size // 4
        full, shard = torch.zeros(elems * n), torch.zeros(elems)
        buf = torch.zeros(elems * n)
        ops = {
            "all_reduce": (lambda: dist.all_reduce(buf), 2 * (n - 1) / n * elems * n * 4),
            "all_gather": (lambda: dist.all_gather_into_tensor(full, shard), (n - 1) / n * elems * n * 4),
            "reduce_scatter": (lambda: dist.reduce_scatter_tensor(shard, full), (n - 1) / n * elems * n * 4),
        }

        def p2p() -> None:  # a ring step: everyone sends `size` bytes to the next rank
            reqs = [dist.isend(shard, (rank + 1) % n), dist.irecv(full[:elems], (rank - 1) % n)]
            for r in reqs:
                r.wait()

        ops["p2p"] = (p2p, float(size))
        for kind, (fn, bus) in ops.items():
            reps = 4 if size >= 2**21 else 10
            fn()
            rounds = []
            for _ in range(COMM_ROUNDS):  # median of rounds: a neighbour's burst spoils one, not the fit
                dist.barrier()
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                dist.barrier()
                rounds.append((time.perf_counter() - start) / reps)
            points[kind].append((bus, sorted(rounds)[len(rounds) // 2]))
    overlap, extra = overlap_fraction(), blocking_extra()
    if rank == 0:
        Path(out_path).write_text(json.dumps({"group_size": n, "points": points, "matmul": grid,
                                              "overlap": overlap, "blocking_extra_s": extra}))
    dist.destroy_process_group()


def calibrate_ranks(group_sizes: tuple[int, ...] = (2,), timeout_s: float = 120
                    ) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, float], dict[str, float]]:
    """Under torchrun at each group size: the collectives' α–β fits, the
    concurrent matmul grid (rank 0's view), the overlap fraction and the
    blocking-collective extra (keyed by group size)."""
    out: dict[str, dict[str, float]] = {}
    matmul: dict[str, float] = {}
    overlap: dict[str, float] = {}
    extra: dict[str, float] = {}
    for n in group_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "comm.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   "-m", "bench.plan.calibrate", "--comm-worker", str(path)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
            if proc.returncode != 0 or not path.exists():
                raise RuntimeError(f"collective calibration at {n} ranks failed:\n{proc.stderr[-2000:]}")
            data = json.loads(path.read_text())
        matmul.update(data["matmul"])
        overlap[str(n)] = data["overlap"]
        extra[str(n)] = data["blocking_extra_s"]
        for kind, pts in data["points"].items():
            out[f"{kind}:{n}"] = {**fit_alpha_beta(pts), "points": pts}
    return out, matmul, overlap, extra


def calibrate(out_path: str | Path | None = None, *, group_sizes: tuple[int, ...] = (2,)) -> MachineProfile:
    """Measure this machine and write its profile (default results/machine_profiles/<host>.json)."""
    cores = os.cpu_count() or 1
    start = time.perf_counter()
    grid = matmul_grid(cores, ranks=1)
    comm, concurrent, overlap, extra = calibrate_ranks(group_sizes)
    grid.update(concurrent)
    profile = MachineProfile(
        host=socket.gethostname(), device="cpu", cores=cores, matmul_flops=grid,
        mem_bandwidth_bytes_per_s=memory_bandwidth(), host_bandwidth_bytes_per_s=memory_bandwidth(),
        op_overhead_s=op_overhead(), overlap=overlap, blocking_extra_s=extra, comm={k: {"alpha_s": v["alpha_s"], "beta_bytes_per_s": v["beta_bytes_per_s"]}
                                           for k, v in comm.items()},
        source=(f"measured on {socket.gethostname()} ({cores} cores): fp32 matmul grid in 1 process and "
                f"in {', '.join(map(str, group_sizes))} concurrent ranks, gloo collectives at {', '.join(map(str, group_sizes))} ranks "
                f"({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {time.perf_counter() - start:.0f} s)"),
    )
    profile.save(out_path or default_profile_path())
    return profile


def default_profile_path(host: str | None = None) -> Path:
    return Path("results") / "machine_profiles" / f"{host or socket.gethostname()}.json"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--comm-worker"]:
        _comm_worker(sys.argv[2])
    else:
        p = calibrate(sys.argv[1] if len(sys.argv) > 1 else None)
        print(json.dumps({"source": p.source, "comm": p.comm}, indent=1))
