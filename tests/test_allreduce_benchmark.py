"""pytest-benchmark micro-benchmarks of the in-house all-reduce algorithms
against the backend's, in one run on a real 2-process gloo group (this
process is rank 0, a peer subprocess rank 1). Ratios go into extra_info and
the benchmark JSON (compare runs with --benchmark-compare); each benchmark
also checks the result it timed."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from impl.allreduce import ALGORITHMS
from tests.conftest import ROOT

ROUNDS, WARMUP = 8, 2
SIZES = {"1MiB": 2**18, "16MiB": 2**22}  # float32 elements
MEDIANS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    peer = subprocess.Popen([sys.executable, str(ROOT / "tests" / "dist" / "allreduce_peer.py"), init], env=env, cwd=ROOT)
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=2)
    store = dist.distributed_c10d._get_default_store()
    commands = iter(range(10**6))

    def post(cmd: str) -> None:
        store.set(f"cmd{next(commands)}", cmd)

    yield post
    post("stop")
    dist.destroy_process_group()
    assert peer.wait(timeout=60) == 0


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("algorithm", ["backend", "ring", "tree", "ps"])
def test_allreduce_busbw(benchmark, group, algorithm, size):
    numel = SIZES[size]
    group(f"{algorithm} {numel} {ROUNDS + WARMUP}")
    t = torch.ones(numel)
    fn = ALGORITHMS[algorithm]
    benchmark.pedantic(fn, args=(t, None), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    # Each call doubles every element (two ranks of equal values): 2^(calls).
    assert torch.all(t == 2.0 ** (ROUNDS + WARMUP)), algorithm
    median = benchmark.stats.stats.median
    MEDIANS[(algorithm, size)] = median
    nbytes = numel * 4
    benchmark.extra_info["busbw_GBps"] = nbytes / median / 1e9  # 2(n-1)/n = 1 at n = 2
    base = MEDIANS.get(("backend", size))
    if base is not None and algorithm != "backend":
        benchmark.extra_info["busbw_vs_backend"] = base / median
