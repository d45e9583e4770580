"""Megatron-Core 0.16.1 through the harness on CPU ranks: its GPTModel, given the
in-house model's initial weights, trains to the single-process reference's
losses (≤ 1e-5 relative, fp32) under DDP, gradient accumulation, tp 2, tp 2 +
sequence parallel, a 2-stage 1F1B pipeline, the distributed optimizer (zero 1),
full and selective recompute, and (4 ranks, `deep`) the interleaved schedule;
its metered traffic equals the papers' volumes up to the differences its notes
name; it is marked patched on CPU; what it cannot run is refused before launch
with the reason."""
from __future__ import annotations

import pytest

from tests.conftest import run_suite
from tests.reference import reference_losses

SUITE = """
name: megatron-adapter
steps: 4
warmup: 2
timeout_s: 240
defaults: {model: tiny, world_size: 2, batch_size: 8, seq_len: 32, adapter: megatron}
include:
  - {microbatches: 2}
  - {optimizer: sgd}
  - {zero: 1}
  - {checkpointing: full}
  - {tp: 2}
  - {tp: 2, sequence_parallel: megatron}
  - {tp: 2, checkpointing: selective}
  - {pp: 2, microbatches: 4}
  - {pp: 2, microbatches: 4, pp_schedule: interleaved, virtual_stages: 2}
  - {zero: 2}
  - {precision: bf16}
  - {cp: 2, sequence_parallel: ring}
  - {pp: 2, microbatches: 4, pp_schedule: gpipe}
  - {adapter: megatron, model: deep, world_size: 4, pp: 4, microbatches: 4, pp_schedule: interleaved, virtual_stages: 2}
"""


def _key(r: dict) -> tuple:
    c = r["config"]
    return (c["model"], c["dp"], c["tp"], c["pp"], c["cp"], c["microbatches"], c["zero"], c["sequence_parallel"],
            c["pp_schedule"] if c["pp"] > 1 else "-", c["checkpointing"], c["precision"], c["optimizer"])


def k(model="tiny", dp=2, tp=1, pp=1, cp=1, m=1, zero=0, sp="none", schedule="-", ckpt="none", precision="fp32",
      optimizer="adamw"):
    return model, dp, tp, pp, cp, m, zero, sp, schedule, ckpt, precision, optimizer


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    return {_key(r): r for r in run_suite(tmp_path_factory, SUITE)}


RUNS = [k(), k(m=2), k(optimizer="sgd"), k(zero=1), k(ckpt="full"), k(dp=1, tp=2), k(dp=1, tp=2, sp="megatron"),
        k(dp=1, tp=2, ckpt="selective"), k(dp=1, pp=2, m=4, schedule="1f1b")]


@pytest.mark.parametrize("key", RUNS, ids=lambda key: "-".join(map(str, key[1:10])))
def test_trains_to_the_reference_losses(recs, key):
    r = recs[key]
    assert r["status"] == "ok", (r["reason"], r.get("stderr_tail"))
    ref = reference_losses(batch_size=8, seq_len=32, seed=0, steps=6, optimizer=key[-1])
    assert len(r["metrics"]["losses"]) == 6
    for a, b in zip(r["metrics"]["losses"], ref):
        assert abs(a - b) <= 1e-5 * b, (key, r["metrics"]["losses"], ref)
    assert r["notes"]["model_type"] == "megatron.core.models.gpt.GPTModel"


def test_interleaved_schedule_at_four_stages(recs):
    r = recs[k(model="deep", dp=1, pp=4, m=4, schedule="interleaved")]
    assert r["status"] == "ok", (r["reason"], r.get("stderr_tail"))
    assert r["notes"]["megatron"]["model_chunks"] == 2
    ref = reference_losses(model="deep", batch_size=8, seq_len=32, seed=0, steps=6)
    for a, b in zip(r["metrics"]["losses"], ref):
        assert abs(a - b) <= 1e-5 * b, (r["metrics"]["losses"], ref)


TRAFFIC = RUNS + [k(dp=1, tp=2, sp="megatron")]


@pytest.mark.parametrize("key", TRAFFIC, ids=lambda key: "-".join(map(str, key[1:10])))
def test_traffic_is_the_papers_volume_plus_named_differences(recs, key):
    """Measured − theory is exactly what the adapter's note names: the distributed
    optimizer's bucket padding (reduce-scatter + all-gather), Megatron SP's backward
    re-gather of each column-parallel input, and one fp32 grad-norm all-reduce."""
    from impl.model_config import PRESETS

    r = recs[key]
    _, dp, tp, pp, _, _, zero, sp, *_ = key
    cfg = PRESETS["tiny"]
    extra = 0.0
    if zero == 1:
        extra += 2 * (dp - 1) / dp * r["notes"]["megatron"]["bucket_padding"]["padded"] * 4
        assert "bucket padding" in r["notes"]["comm_vs_theory"]
    if sp == "megatron":
        extra += (2 * cfg.n_layers + 1) * 8 * 32 * cfg.dim * 4 * (tp - 1) / tp
        assert "all-gathers its sequence-sharded input again" in r["notes"]["comm_vs_theory"]
    for g in (tp * pp, dp if zero == 1 else 1):
        extra += 4 * 2 * (g - 1) / g if g > 1 else 0.0
    measured, theory = r["metrics"]["comm_bytes_per_step"], r["theory"]["comm_bytes_per_step"]
    assert measured - theory == pytest.approx(extra, abs=1e-6), (measured, theory, extra, r["metrics"]["comm"])
    if extra == 0:
        assert "comm_vs_theory" not in r["notes"]


def test_zero1_is_the_distributed_optimizer_and_shards_its_state(recs):
    plain, dist_opt = recs[k()], recs[k(zero=1)]
    assert dist_opt["notes"]["megatron"]["ddp"]["use_distributed_optimizer"] is True
    assert any("DistributedOptimizer" in o for o in dist_opt["notes"]["megatron"]["optimizer"])
    # Adam's two moments over N_d = 2 ranks (padding aside), against the whole on DDP
    ratio = dist_opt["metrics"]["model_state_bytes"]["optimizer"] / plain["metrics"]["model_state_bytes"]["optimizer"]
    assert ratio == pytest.approx(0.5, rel=0.01)
    assert set(dist_opt["metrics"]["comm"]) >= {"reduce_scatter", "all_gather"}


def test_cpu_records_are_marked_patched_and_list_non_defaults(recs):
    r = recs[k(dp=1, tp=2)]
    assert r["notes"]["patched"] is True
    assert {p["name"] for p in r["notes"]["patches"]} == {"current_device", "rng_state", "causal_mask", "factories",
                                                           "type_names", "synchronize"}
    settings = {s["setting"] for s in r["notes"]["framework_config"]["non_default"]}
    assert settings == {"parallel_state.order", "optimizer.config_overrides", "optimizer.clip_grad"}


@pytest.mark.parametrize("key, words", [
    (k(zero=2), "Megatron-FSDP"),
    (k(precision="bf16"), "not on cpu"),
    (k(dp=1, cp=2, sp="ring"), "Transformer Engine"),
    (k(dp=1, pp=2, m=4, schedule="gpipe"), "1F1B and interleaved 1F1B only"),
    (k(dp=1, pp=2, m=4, schedule="interleaved"), "wrong losses"),
])
def test_refused_before_launch_with_the_reason(recs, key, words):
    r = recs[key]
    assert r["status"] == "unsupported" and words in r["reason"], r["reason"]
    assert r["timing"] == {}


def test_every_technique_runs_or_has_a_reason() -> None:
    """The support-matrix row (`bench list`): no gap without its reason."""
    from bench import adapters
    from bench.config.techniques import TECHNIQUES

    caps = adapters.get("megatron").capabilities
    for t in TECHNIQUES:
        why = caps.support(t.name, "cpu")
        assert why is None or "not implemented by this adapter" not in why, (t.name, why)
