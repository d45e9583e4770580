"""MFU's peak (#23): chosen by exact device name and by the cell's math mode
(bf16/fp16, TF32 when torch allows it for fp32 matmuls, plain fp32), from the
data sheets; a device or mode not in the table gets no MFU."""
from __future__ import annotations

import pytest

from bench.meters.throughput import gpu_peak_flops, math_mode


@pytest.mark.parametrize("precision, tf32, mode", [("bf16", False, "bf16"), ("fp16", True, "fp16"),
                                                   ("fp32", True, "tf32"), ("fp32", False, "fp32")])
def test_math_mode(precision, tf32, mode):
    assert math_mode(precision, tf32) == mode


def test_exact_names_not_substrings():
    assert gpu_peak_flops("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H200 NVL", "bf16") == pytest.approx(835.5e12)  # a different device
    assert gpu_peak_flops("NVIDIA L4", "bf16") == pytest.approx(121e12)
    assert gpu_peak_flops("NVIDIA L40", "bf16") is None  # not L4, not L40S: unknown, no MFU
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16") is None


def test_an_fp32_cell_is_not_measured_against_the_bf16_peak():
    h100 = "NVIDIA H100 80GB HBM3"
    assert gpu_peak_flops(h100, "fp32") == pytest.approx(66.9e12)
    assert gpu_peak_flops(h100, "tf32") == pytest.approx(gpu_peak_flops(h100, "bf16") / 2, rel=1e-3)
    assert gpu_peak_flops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores


def test_planner_aliases_name_one_device():
    assert gpu_peak_flops("H100 SXM") == gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16")
