"""`strategy: fsdp1` (PyTorch's FullyShardedDataParallel) through the whole
harness at 2 ranks: losses equal the single-process reference, traffic and
model state equal the ZeRO formulas except where FSDP1 really differs (the
root unit is gathered once), and what it cannot do is declared before launch."""
from __future__ import annotations

import pytest

from impl.model import build_model, model_config, total_params
from tests.conftest import run_suite
from tests.reference import reference_losses

SUITE = """
name: torch-fsdp1
steps: 4
warmup: 2
timeout_s: 180
defaults: {model: tiny, world_size: 2, batch_size: 8, seq_len: 32, adapter: torch, strategy: fsdp1}
matrix:
  zero: [0, 2, 3]
include:
  - {zero: 3, precision: bf16, checkpointing: full}
  - {zero: 2, microbatches: 2}
  - {zero: 1}
  - {zero: 3, offload: optimizer+params}
"""
N = 2
PSI = total_params(model_config("tiny"))


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    return {(r["config"]["zero"], r["config"]["precision"], r["config"]["microbatches"], r["config"]["offload"]): r
            for r in run_suite(tmp_path_factory, SUITE)}


def test_statuses_and_reasons(recs):
    assert recs[(1, "fp32", 1, "none")]["status"] == "unsupported"
    assert "no ZeRO-1 sharding strategy" in recs[(1, "fp32", 1, "none")]["reason"]
    assert recs[(3, "fp32", 1, "optimizer+params")]["status"] == "unsupported"
    assert "pins host memory" in recs[(3, "fp32", 1, "optimizer+params")]["reason"]
    ran = [r for k, r in recs.items() if k[0] != 1 and k[3] == "none"]
    assert len(ran) == 5 and all(r["status"] == "ok" for r in ran), [(r["status"], r["reason"]) for r in ran]
    assert "SHARD_GRAD_OP" in recs[(2, "fp32", 1, "none")]["notes"]["wrapper"]


def test_losses_match_single_process_reference(recs):
    ref = reference_losses(batch_size=8, seq_len=32, seed=0, steps=6)
    for key in ((0, "fp32", 1, "none"), (2, "fp32", 1, "none"), (3, "fp32", 1, "none"), (2, "fp32", 2, "none")):
        for a, b in zip(recs[key]["metrics"]["losses"], ref, strict=True):
            assert abs(a - b) <= 1e-4 * b, (key, a, b)
    # bf16: 16-bit loss checks that need learning: tests/test_precision_learning.py


def test_traffic_equals_zero_theory_and_the_root_unit_difference(recs):
    assert abs(recs[(0, "fp32", 1, "none")]["theory_ratio"]["comm_bytes_per_step"] - 1) < 0.01
    assert abs(recs[(2, "fp32", 1, "none")]["theory_ratio"]["comm_bytes_per_step"] - 1) < 0.01
    model = build_model(model_config("tiny"), 0)
    root = sum(p.numel() for m in (model.norm, model.output) for p in m.parameters())
    zero3 = recs[(3, "fp32", 1, "none")]
    expected = 4 * (3 * PSI - root) * (N - 1) / N
    assert abs(zero3["metrics"]["comm_bytes_per_step"] / expected - 1) < 0.005
    assert zero3["theory_ratio"]["comm_bytes_per_step"] < 0.95
    assert "never reshards the root unit" in zero3["notes"]["comm_vs_theory"]


def test_model_state_is_sharded(recs):
    for key in ((3, "fp32", 1, "none"), (3, "bf16", 1, "none")):
        assert abs(recs[key]["theory_ratio"]["model_state_total"] - 1) < 0.05, key
    zero2 = recs[(2, "fp32", 1, "none")]["theory_ratio"]
    assert abs(zero2["model_state_params"] - 0.5) < 0.05  # sharded at rest, unlike ZeRO-2's full copy
    assert abs(zero2["model_state_optimizer"] - 1) < 0.05
