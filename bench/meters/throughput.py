"""Step-time statistics, tokens/s, model FLOPs and MFU (DESIGN.md definitions)."""
from __future__ import annotations

import statistics
import time

from impl.model_config import ModelConfig, matmul_params

FLOPS_FORMULA_VERSION = "palm-appB-6N+12LHQT-v1"

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name substring.
# An unknown device gets no MFU, never a guessed one.
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
}


def gpu_peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_FLOPS.items():
        if key in device_name:
            return peak
    return None


def flops_per_token(cfg: ModelConfig, seq_len: int, *, attention_density: float = 1.0,
                    attention_only: bool = False) -> float:
    """6·N_matmul + 12·L·H·d_head·S·density (PaLM App. B; full S², no causal
    discount). ``attention_density`` (computed blocks ÷ all blocks, 1 for dense)
    counts only the blocks a sparse pattern computes. ``attention_only``: one
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
