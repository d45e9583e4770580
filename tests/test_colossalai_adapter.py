"""Colossal-AI 0.5.0 through the harness on 2 CPU ranks: TorchDDPPlugin trains
the same math as the reference; its Lamb/Lars run; TorchFSDPPlugin (patched for
CPU, and marked so) matches the reference and FSDP1's traffic; HybridParallelPlugin
(patched) trains transformers' Llama with our weights under tp 2 (+ sequence
parallel) and a 2-stage 1F1B pipeline to the same losses; the CUDA-only
plugins are unsupported on CPU with the blocking assertion quoted, decided
before launch."""
from __future__ import annotations

import pytest

from impl.model import build_model, model_config, total_params
from tests.conftest import run_suite
from tests.reference import reference_losses

SUITE = """
name: colossalai-adapter
steps: 4
warmup: 2
timeout_s: 180
defaults: {model: tiny, world_size: 2, batch_size: 8, seq_len: 32, adapter: colossalai}
matrix:
  optimizer: [adamw, lars]
include:
  - {microbatches: 2}
  - {zero: 2}
  - {zero: 3}
  - {strategy: fsdp1, zero: 2}
  - {strategy: fsdp1, zero: 3}
  - {tp: 2}
  - {tp: 2, sequence_parallel: megatron}
  - {pp: 2, microbatches: 2}
"""
N = 2
PSI = total_params(model_config("tiny"))


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    return {(r["config"]["optimizer"], r["config"]["microbatches"], r["config"]["zero"], r["config"]["strategy"],
             r["config"]["tp"], r["config"]["pp"], r["config"]["sequence_parallel"]): r
            for r in run_suite(tmp_path_factory, SUITE)}


def _key(optimizer="adamw", microbatches=1, zero=0, strategy="manual", tp=1, pp=1, sp="none"):
    return optimizer, microbatches, zero, strategy, tp, pp, sp


def test_torch_ddp_plugin_matches_reference(recs):
    ref = reference_losses(batch_size=8, seq_len=32, seed=0, steps=6)
    for key in (_key(), _key(microbatches=2)):
        r = recs[key]
        assert r["status"] == "ok" and r["notes"]["plugin"].startswith("TorchDDPPlugin") and r["notes"]["patched"] is False
        for a, b in zip(r["metrics"]["losses"], ref):
            assert abs(a - b) <= 1e-5 * b, (key, a, b)
        assert abs(r["theory_ratio"]["comm_bytes_per_step"] - 1) < 0.01


def test_lars_runs_and_keeps_one_momentum(recs):
    r = recs[_key("lars")]
    assert r["status"] == "ok" and r["notes"]["optimizer_class"].endswith("Lars")
    assert r["metrics"]["model_state_bytes"]["optimizer"] == pytest.approx(4 * PSI, rel=0.01)
    losses = r["metrics"]["losses"]
    assert all(l == l for l in losses) and losses[-1] < losses[0] + 0.05  # finite, not diverging


def test_cuda_only_plugins_are_unsupported_with_the_assertion(recs):
    zero2, zero3 = recs[_key(zero=2)], recs[_key(zero=3)]
    assert zero2["status"] == "unsupported" and "device is required" in zero2["reason"]
    assert zero3["status"] == "unsupported" and "not supported for cpu accelerator" in zero3["reason"]
    assert zero2["timing"] == {} and zero3["timing"] == {}  # decided before launch


def test_torch_fsdp_plugin_is_patched_and_matches_reference(recs):
    ref = reference_losses(batch_size=8, seq_len=32, seed=0, steps=6)
    for zero, strategy in ((2, "SHARD_GRAD_OP"), (3, "FULL_SHARD")):
        r = recs[_key(zero=zero, strategy="fsdp1")]
        assert r["status"] == "ok", r["reason"]
        assert strategy in r["notes"]["plugin"] and r["notes"]["patched"] is True
        assert [p.split(":")[0] for p in r["notes"]["patches"]] == ["fsdp_device_id"]
        for a, b in zip(r["metrics"]["losses"], ref, strict=True):
            assert abs(a - b) <= 1e-4 * b, (zero, a, b)


def test_torch_fsdp_plugin_traffic_is_fsdp1s(recs):
    """The same bytes as the torch adapter's FSDP1 (tests/test_torch_fsdp1.py):
    ZeRO-2 theory exactly; ZeRO-3 less the root unit's second all-gather."""
    assert abs(recs[_key(zero=2, strategy="fsdp1")]["theory_ratio"]["comm_bytes_per_step"] - 1) < 0.01
    model = build_model(model_config("tiny"), 0)
    root = sum(p.numel() for m in (model.norm, model.output) for p in m.parameters())
    zero3 = recs[_key(zero=3, strategy="fsdp1")]
    assert abs(zero3["metrics"]["comm_bytes_per_step"] / (4 * (3 * PSI - root) * (N - 1) / N) - 1) < 0.005
    assert "never reshards the root unit" in zero3["notes"]["comm_vs_theory"]


def test_fsdp1_and_hybrid_limits_are_decided_before_launch():
    from bench.adapters.colossalai.adapter import ColossalAIAdapter
    from bench.config.knobs import Knobs

    adapter = ColossalAIAdapter()
    cell = {"adapter": "colossalai", "world_size": 2, "strategy": "fsdp1"}
    assert "no ZeRO-1 sharding strategy" in adapter.why_not(Knobs(**cell, zero=1))
    assert adapter.why_not(Knobs(**cell, zero=3, precision="bf16")) is None  # FSDP1 MixedPrecision, not LowLevelZero
    assert "device is required" in adapter.why_not(Knobs(**{**cell, "strategy": "manual"}, zero=2))
    hybrid = {"adapter": "colossalai", "world_size": 4, "tp": 2, "batch_size": 8}
    assert "use dp = 1" in adapter.why_not(Knobs(**hybrid))
    assert "per shard" in adapter.why_not(Knobs(**hybrid, pp=2, optimizer="lamb"))
    assert "no GPipe" in adapter.why_not(Knobs(**hybrid, pp=2, pp_schedule="gpipe"))
    assert adapter.why_not(Knobs(**hybrid, pp=2)) is None


def test_report_marks_patched_cells(recs):
    from bench.analysis.report.build import frame, support_matrix

    rows = {row["technique"]: row["cells"][0]["text"] for row in support_matrix(list(recs.values()))["rows"]}
    assert rows["strategy_fsdp1"] == "ok (patched)" and rows["optimizer_lars"] == "ok"
    labels = dict(zip(frame(list(recs.values())).cell, frame(list(recs.values())).label))
    assert labels[recs[_key(zero=3, strategy="fsdp1")]["cell_id"]].endswith("[patched]")
    assert not labels[recs[_key()]["cell_id"]].endswith("[patched]")


def test_llama_copy_has_the_decoders_logits():
    """Checked single-process before any distributed cell trusts it: HF's
    rotate-half RoPE on permuted q/k rows equals our interleaved pairs."""
    import torch

    from bench.adapters.colossalai.hf_model import to_llama
    from bench.workloads.train import global_batch

    cfg = model_config("tiny")
    ours = build_model(cfg, 0)
    batch = global_batch(cfg, batch_size=4, seq_len=32, seed=0, step=0)
    with torch.no_grad():
        expected = ours(batch.inputs)
        got = to_llama(ours)(input_ids=batch.inputs, attention_mask=torch.ones_like(batch.inputs)).logits
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item() + 1e-6


def test_hybrid_parallel_matches_reference(recs):
    ref = reference_losses(batch_size=8, seq_len=32, seed=0, steps=6)
    cells = {_key(tp=2): ["cpu_accelerator_rng"], _key(tp=2, sp="megatron"): ["cpu_accelerator_rng"],
             _key(pp=2, microbatches=2): ["cpu_accelerator_rng", "hccl_query"]}
    for key, patches in cells.items():
        r = recs[key]
        assert r["status"] == "ok", (key, r["reason"])
        assert r["notes"]["model_type"] == "transformers LlamaForCausalLM (same config and weights)"
        assert r["notes"]["patched"] is True and [p.split(":")[0] for p in r["notes"]["patches"]] == patches
        for a, b in zip(r["metrics"]["losses"], ref, strict=True):
            assert abs(a - b) <= 1e-4 * b, (key, a, b)
    assert "split_gather" in recs[_key(tp=2, sp="megatron")]["notes"]["plugin"]
    assert abs(recs[_key(pp=2, microbatches=2)]["theory_ratio"]["comm_bytes_per_step"] - 1) < 0.01


def test_tensor_parallel_traffic_is_seven_all_reduces_per_block(recs):
    """HF's unfused q/k/v and gate/up: 2 forward + 5 backward activation
    all-reduces per block, + embedding forward and head-input backward; and one
    all-gather of the (B, T, V) logits (bus bytes for N = 2: the message size)."""
    cfg, (b, t) = model_config("tiny"), (8, 32)
    comm = recs[_key(tp=2)]["metrics"]["comm"]
    assert comm["all_reduce"]["bus_bytes"] == (7 * cfg.n_layers + 2) * b * t * cfg.dim * 4
    assert comm["all_gather"]["bus_bytes"] == b * t * cfg.vocab_size * 4 / 2
    assert "7 activation all-reduces" in recs[_key(tp=2)]["notes"]["comm_vs_theory"]
