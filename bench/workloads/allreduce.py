"""The `allreduce` workload: one all-reduce of `message_bytes` per step.

It times impl/allreduce.py's algorithms (or the backend's) through the same
runner, meters and records as training cells; algbw and busbw follow
nccl-tests: algbw = bytes / time, busbw = algbw · 2(n−1)/n.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from impl.allreduce import ALGORITHMS, validate_algorithm


def build_allreduce_step(knobs: Any, device: torch.device) -> tuple[Callable[[int], None], dict[str, Any]]:
    algorithm = knobs.allreduce
    validate_algorithm(algorithm)  # checked against the backend before it is timed
    # Zeros stay zeros however often they are summed: no overflow over many steps.
    buf = torch.zeros(knobs.message_bytes // 4, dtype=torch.float32, device=device)
    fn = ALGORITHMS[algorithm]

    def step(_: int) -> None:
        fn(buf, None)

    notes = {"workload": "allreduce", "algorithm": f"impl.allreduce.{algorithm}", "dtype": "float32",
             "validated_against": "torch.distributed.all_reduce (float64, rtol 1e-12)"}
    return step, notes


def bandwidths(message_bytes: int, n: int, seconds: float) -> dict[str, float]:
    algbw = message_bytes / seconds
    return {"algbw_bytes_per_s": algbw, "busbw_bytes_per_s": algbw * 2 * (n - 1) / n}
