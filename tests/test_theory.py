"""The theory module reproduces the papers' own numbers."""
from __future__ import annotations

import pytest

from bench import theory
from bench.config.knobs import Knobs
from tests.conftest import bench


@pytest.mark.parametrize("stage,expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_zero_paper_figure1(stage, expected_gb):
    # Rajbhandari et al. 2020, Fig. 1: Ψ = 7.5B, N_d = 64, K = 12 (mixed-precision Adam).
    s = theory.model_state_bytes(7.5e9, zero=stage, dp=64, precision="fp16", optimizer="adamw")
    assert sum(s.values()) / 1e9 == pytest.approx(expected_gb, rel=0.01)


def test_fp32_states():
    s = theory.model_state_bytes(100, zero=0, dp=4, precision="fp32")
    assert s == {"params": 400, "grads": 400, "optimizer": 800}
    s3 = theory.model_state_bytes(100, zero=3, dp=4, precision="fp32")
    assert s3 == {"params": 100, "grads": 100, "optimizer": 200}


@pytest.mark.parametrize("zero,factor", [(0, 2), (1, 2), (2, 2), (3, 3)])
def test_dp_comm_volumes(zero, factor):
    assert theory.dp_comm_elements(1e6, zero=zero, dp=8) == pytest.approx(factor * 1e6 * 7 / 8)
    assert theory.dp_comm_elements(1e6, zero=zero, dp=1) == 0


def test_bubble():
    assert theory.bubble_fraction(4, 8, "gpipe") == pytest.approx(3 / 8)
    assert theory.bubble_fraction(4, 8, "1f1b") == pytest.approx(3 / 8)
    assert theory.bubble_fraction(4, 8, "interleaved", 2) == pytest.approx(3 / 16)
    assert theory.bubble_fraction(1, 8, "gpipe") is None


def test_activation_memory_korthikanti():
    # GPT-3 175B-like layer (s=2048, b=1, h=12288, a=96): 34·s·b·h + 5·a·s²·b.
    s, b, h, a = 2048, 1, 12288, 96
    assert theory.activation_bytes_per_layer(s=s, b=b, h=h, a=a) == pytest.approx(s * b * h * 34 + 5 * a * s * s * b)
    sp = theory.activation_bytes_per_layer(s=s, b=b, h=h, a=a, tp=8, sequence_parallel=True)
    assert sp == pytest.approx((s * b * h * 34 + 5 * a * s * s * b) / 8)
    assert theory.activation_bytes_per_layer(s=s, b=b, h=h, a=a, recompute="full") == 2 * s * b * h


def test_predict_fills_the_record_block():
    t = theory.predict(Knobs(world_size=4, zero=1, precision="bf16"))
    psi = t["params"]
    assert t["comm_bytes_per_step"] == pytest.approx(2 * psi * 3 / 4 * 2)
    assert t["model_state_bytes"]["optimizer"] == pytest.approx(12 * psi / 4)
    assert t["bubble_fraction"] is None


def test_cli_theory_memory_prints_paper_numbers():
    out = bench("theory", "memory", "--params", "7.5e9", "--dp", "64").stdout
    for figure in ("120.00", "31.41", "16.64", "1.88"):
        assert figure in out


def test_cli_theory_comm():
    out = bench("theory", "comm", "--params", "1e9", "--dp", "4").stdout
    assert "1.5e+09" in out and "2.25e+09" in out
