"""The `torch` adapter (DDP, ZeroRedundancyOptimizer, FSDP2, autocast,
checkpointing) through the whole harness at 2 ranks, against the
single-process reference and the ZeRO formulas."""
from __future__ import annotations

import pytest

from impl.model import model_config, total_params
from tests.conftest import run_suite
from tests.reference import reference_losses

SUITE = """
name: torch-adapter
steps: 4
warmup: 2
timeout_s: 180
defaults: {model: tiny, world_size: 2, batch_size: 8, seq_len: 32, precision: fp32, adapter: torch}
matrix:
  zero: [1, 2, 3]
include:
  - {zero: 3, offload: optimizer+params}
  - {zero: 3, precision: bf16}
  - {zero: 0, precision: fp16}
  - {zero: 3, checkpointing: full}
  - {zero: 2, offload: optimizer}
"""


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    return {(r["config"]["zero"], r["config"]["offload"], r["config"]["precision"], r["config"]["checkpointing"]): r
            for r in run_suite(tmp_path_factory, SUITE)}


def test_statuses(recs):
    bad = recs[(2, "optimizer", "fp32", "none")]
    assert bad["status"] == "unsupported" and "CPUOffloadPolicy" in bad["reason"]
    assert all(r["status"] == "ok" for k, r in recs.items() if k != (2, "optimizer", "fp32", "none")), \
        {k: r["reason"] for k, r in recs.items()}


def test_fp32_loss_parity(recs):
    ref = reference_losses(batch_size=8, seq_len=32, seed=0, steps=6)
    for key, r in recs.items():
        if r["status"] == "ok" and key[2] == "fp32":
            for a, b in zip(r["metrics"]["losses"], ref):
                assert abs(a - b) <= 1e-4 * b, (key, a, b)


def test_mixed_precision_cells_ran(recs):
    # 16-bit loss checks that need learning: tests/test_precision_learning.py
    for key in ((3, "none", "bf16", "none"), (0, "none", "fp16", "none")):
        assert recs[key]["status"] == "ok", recs[key]["reason"]
    assert recs[(0, "none", "fp16", "none")]["metrics"]["skipped_steps"] == 0  # GradScaler's, recorded


def test_grad_scaler_step_counts_skipped_updates():
    """A scale that overflows fp16 gradients: GradScaler skips the update, and the count says so."""
    import torch

    from bench.adapters.torch.adapter import _ScaledStep

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = _ScaledStep(opt, torch.amp.GradScaler("cpu", init_scale=2.0**100))
    x = torch.full((2, 4), 1e30)  # weight gradients x·2^100: inf in fp32
    before = model.weight.detach().clone()
    step.scale(model(x).sum()).backward()
    step.step()
    assert step.skipped == 1 and torch.equal(model.weight, before)
    step.zero_grad()
    step.scale(model(x).sum()).backward()  # the scale backed off to 2^99: still inf
    step.step()
    assert step.skipped == 2
    step.zero_grad()
    step.scale(model(torch.ones(2, 4)).sum()).backward()  # finite: the update is applied
    step.step()
    assert step.skipped == 2 and not torch.equal(model.weight, before)


def test_fsdp2_comm_equals_zero_theory(recs):
    for key in ((2, "none", "fp32", "none"), (3, "none", "fp32", "none"), (3, "optimizer+params", "fp32", "none")):
        assert abs(recs[key]["theory_ratio"]["comm_bytes_per_step"] - 1) < 0.01, key
    zero3 = recs[(3, "none", "fp32", "none")]["metrics"]["comm"]
    assert zero3["all_gather"]["bytes"] == 2 * zero3["reduce_scatter"]["bytes"]


def test_zero_redundancy_optimizer_sends_more_and_says_why(recs):
    r = recs[(1, "none", "fp32", "none")]
    psi_bytes = 4 * total_params(model_config("tiny"))
    n = 2
    expected = 2 * psi_bytes * (n - 1) / n + psi_bytes  # DDP all-reduce + owner broadcasts
    assert abs(r["metrics"]["comm_bytes_per_step"] / expected - 1) < 0.01
    assert "broadcasts each updated shard" in r["notes"]["comm_vs_theory"]
    assert abs(r["theory_ratio"]["model_state_total"] - 1) < 0.05


def test_fsdp2_zero3_model_state(recs):
    r = recs[(3, "none", "fp32", "none")]
    for kind in ("params", "grads", "optimizer", "total"):
        assert abs(r["theory_ratio"][f"model_state_{kind}"] - 1) < 0.05, kind
