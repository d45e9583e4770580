"""CUDA paths that a CPU machine can still check (#24): flex_attention tiles that
divide the sparse block, the all-reduce validation tensor on the backend's device,
more ranks than GPUs refused before launch, and the device suite's budget."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.parametrize("block, tile", [(64, 64), (32, 32), (192, 64), (96, 32)])
def test_flex_tiles_divide_the_block_on_cuda(block, tile):
    from impl.sparse_attention import flex_kernel_options

    options = flex_kernel_options(block, "cuda")
    assert set(options.values()) == {tile} and block % tile == 0
    assert {"BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"} == set(options)


def test_flex_keeps_its_defaults_where_they_divide():
    from impl.sparse_attention import flex_kernel_options

    assert flex_kernel_options(128, "cuda") is None and flex_kernel_options(256, "cuda") is None
    assert flex_kernel_options(64, "cpu") is None
    with pytest.raises(ValueError, match="at least 16"):
        flex_kernel_options(24, "cuda")


def test_allreduce_validation_tensor_follows_the_backend(monkeypatch):
    import impl.allreduce as ar

    monkeypatch.setattr(ar.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(ar.torch.cuda, "current_device", lambda: 3)
    assert ar.backend_device() == torch.device("cuda", 3)
    monkeypatch.setattr(ar.dist, "get_backend", lambda group=None: "gloo")
    assert ar.backend_device() == torch.device("cpu")


def test_more_ranks_than_gpus_is_refused_before_launch(monkeypatch):
    from bench.run import runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    reason = runner._device_missing("cuda", 2)
    assert reason and "2 ranks on this host but 1 visible CUDA device" in reason
    assert runner._device_missing("cuda", 1) is None
    assert runner._device_missing("cpu", 8) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in runner._device_missing("cuda", 1)


def test_device_suite_fits_its_budget_and_starts_with_every_adapter():
    """suites/gpu-smoke.yaml: at most 14 cells, one default cell per adapter first,
    and an estimated time (planner step estimates + fixed costs) within 7 minutes."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from device_check import budget
    finally:
        sys.path.pop(0)
    from bench import adapters
    from bench.config.suite import load_suite

    suite = ROOT / "suites" / "gpu-smoke.yaml"
    _, cells = load_suite(suite)
    assert len(cells) <= 14
    assert [c.knobs.adapter for c in cells[: len(adapters.names())]] == ["inhouse", "torch", "deepspeed",
                                                                       "colossalai", "megatron"]
    total, lines = budget(Path(suite))
    print(f"estimated {total:.0f} s", *lines, sep="\n")
    assert 0 < total <= 420 and len(lines) == len(cells)
    assert any(c.knobs.model == "llama-1b" for c in cells)  # the MFU cell
    assert sum(c.knobs.model == "deep" and c.knobs.pp > 1 for c in cells) == 2  # the bubble cells


def test_compiled_cell_compiles_the_loss_and_matches_the_reference(tmp_path_factory):
    """`fusion: compile` (the MFU path): blocks and the loss compiled by inductor,
    losses equal to the single-process reference (tiny, fp32, 2 ranks)."""
    from tests.conftest import run_suite
    from tests.reference import reference_losses

    (rec,) = run_suite(tmp_path_factory, """
name: compiled-loss
steps: 2
warmup: 1
defaults: {adapter: inhouse, model: tiny, world_size: 2, batch_size: 8, seq_len: 32, fusion: compile}
""")
    assert rec["status"] == "ok", (rec["reason"], rec.get("stderr_tail"))
    assert rec["notes"]["fusion"]["compiled_loss"] is True
    ref = reference_losses(batch_size=8, seq_len=32, seed=0, steps=3)
    for a, b in zip(rec["metrics"]["losses"], ref):
        assert abs(a - b) <= 1e-5 * b, (rec["metrics"]["losses"], ref)
