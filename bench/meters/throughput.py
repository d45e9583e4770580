"""Step-time statistics, tokens/s, model FLOPs and MFU (DESIGN.md definitions)."""
from __future__ import annotations

import statistics
import time

from impl.model_config import ModelConfig, matmul_params

FLOPS_FORMULA_VERSION = "palm-appB-6N+12LHQT-computed-blocks-v2"  # v1: dense at full S², sparse by blocks

# Dense peaks (FLOP/s) by exact device name (torch.cuda.get_device_name) and
# math mode, from the vendors' data sheets (dense, i.e. half the "with sparsity"
# figures): bf16/fp16 tensor cores, TF32 tensor cores, plain fp32. A name not in
# the table — or a mode the device lacks (V100 bf16) — gets no MFU, never a
# guessed one. "NVIDIA H200 NVL" and "NVIDIA L40" are different devices from
# "NVIDIA H200" and "NVIDIA L4": exact names, not substrings.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM5
    "NVIDIA H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12},
    "NVIDIA H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "NVIDIA H200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM
    "NVIDIA H200 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "NVIDIA A100-SXM4-80GB": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "NVIDIA A100-SXM4-40GB": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "NVIDIA A100 80GB PCIe": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "NVIDIA A100-PCIE-40GB": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "NVIDIA L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
    "NVIDIA L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "Tesla V100-SXM2-16GB": {"fp16": 125e12, "fp32": 15.7e12},
    "Tesla V100-SXM2-32GB": {"fp16": 125e12, "fp32": 15.7e12},
}


GPU_ALIASES: dict[str, str] = {
    # Short names the planner's --gpu-type accepts, each for one exact device.
    "H100 SXM": "NVIDIA H100 80GB HBM3", "H100 PCIe": "NVIDIA H100 PCIe", "H100 NVL": "NVIDIA H100 NVL",
    "H200": "NVIDIA H200", "H200 NVL": "NVIDIA H200 NVL", "A100": "NVIDIA A100-SXM4-80GB", "L40S": "NVIDIA L40S",
    "L4": "NVIDIA L4", "V100": "Tesla V100-SXM2-32GB",
}


def math_mode(precision: str, tf32: bool) -> str:
    """The tensor math a cell's matmuls run in: bf16/fp16, or for fp32 cells TF32 when
    torch allows it for matmuls (``torch.backends.cuda.matmul.allow_tf32``), else fp32."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if tf32 else "fp32"


def gpu_peak_flops(device_name: str, mode: str = "bf16") -> float | None:
    """The data-sheet dense peak of this exact device (or short alias) in this math mode, or None."""
    return PEAK_FLOPS.get(GPU_ALIASES.get(device_name, device_name), {}).get(mode)


def tf32_settings() -> dict[str, object]:
    """What torch will do with fp32 matmuls and convolutions on CUDA (recorded with every cuda cell)."""
    import torch

    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def cuda_gemm_flops(device, mode: str, n: int = 8192, seconds: float = 0.3) -> float:
    """Measured square-GEMM throughput of this device in this math mode: the ceiling the
    cell's MFU is also reported against (the data-sheet peak is rarely reachable)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def flops_per_token(cfg: ModelConfig, seq_len: int, *, attention_density: float = 1.0,
                    attention_only: bool = False) -> float:
    """6·N_matmul + 12·L·H·d_head·S·density (PaLM App. B's attention term, scaled
    by ``attention_density``: computed blocks ÷ all blocks, the causal lower
    triangle for dense attention and the pattern's blocks for sparse attention —
    ``bench.workloads.attention.attention_density``). ``attention_only``: one
    attention core's forward + backward (the `attention` workload), 12·H·d_head·S·density."""
    attn = 12 * cfg.n_heads * cfg.head_dim * seq_len * attention_density
    if attention_only:
        return attn
    return 6 * matmul_params(cfg) + cfg.n_layers * attn


def cpu_matmul_peak_flops(threads: int, seconds: float = 0.3, n: int = 512) -> float:
    """Measured fp32 matmul throughput with `threads` threads: the CPU 'peak'
    (labelled as measured in every record that uses it)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
        return 2 * n**3 * reps / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)


def step_stats(samples_s: list[float]) -> dict[str, float]:
    """Median with a distribution-free 95 % CI (order statistics), p10, p90."""
    xs = sorted(samples_s)
    n = len(xs)
    median = statistics.median(xs)
    # Binomial order-statistic interval for the median: ranks n/2 ± 1.96·sqrt(n)/2.
    half = 1.96 * (n**0.5) / 2
    lo = xs[max(0, int(n / 2 - half))]
    hi = xs[min(n - 1, int(n / 2 + half + 0.999))]
    q = statistics.quantiles(xs, n=10, method="inclusive") if n > 1 else [xs[0]] * 9
    return {"median_s": median, "ci95_low_s": lo, "ci95_high_s": hi, "p10_s": q[0], "p90_s": q[-1], "mean_s": statistics.fmean(xs)}
