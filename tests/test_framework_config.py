"""`framework_config`: every framework as its docs set it up (`default`), the
theory-matching settings as a named variant (`theory`), and a same-budget search
(`tuned`). Checked against the frameworks' own code: DeepSpeed's config class
resolves the defaults, DeepSpeed's partitioner gives the default pipeline cut,
and the tuned candidates' settings show in the traffic they cause."""
from __future__ import annotations

import itertools

import pytest

from bench.analysis.report.adapter_ratios import adapter_ratio_rows
from bench.analysis.tuning import best_tuned
from bench.config.framework_config import TUNING_BUDGET, tuning_space
from bench.config.knobs import Knobs, identity
from bench.config.suite import SuiteError, parse_suite
from impl.model import build_model, model_config, total_params
from tests.conftest import run_suite
from tests.reference import reference_losses

PSI = total_params(model_config("tiny"))
STEPS, WARMUP = 3, 2


def _zero_config(knobs: Knobs):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from bench.adapters.deepspeed.adapter import deepspeed_config

    model = build_model(model_config("tiny"), 0)
    config = deepspeed_config(knobs, PSI, max(p.numel() for p in model.parameters()))
    return DeepSpeedZeroConfig(**config["zero_optimization"])


def test_default_zero3_resolves_to_deepspeeds_own_defaults_and_theory_to_the_paper_settings():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    stock = DeepSpeedZeroConfig(stage=3)  # DeepSpeed's own defaults
    default = _zero_config(Knobs(adapter="deepspeed", world_size=2, zero=3))
    for field in ("prefetch_bucket_size", "param_persistence_threshold", "max_reuse_distance", "overlap_comm",
                  "max_live_parameters", "contiguous_gradients"):
        assert getattr(default, field) == getattr(stock, field), field
    # The one exception, recorded: buckets capped at the model size (one bucket either way).
    assert default.reduce_bucket_size == PSI < stock.reduce_bucket_size
    theory = _zero_config(Knobs(adapter="deepspeed", world_size=2, zero=3, framework_config="theory"))
    assert (theory.prefetch_bucket_size, theory.param_persistence_threshold, theory.max_reuse_distance) == (0, 0, 0)


def test_cell_ids_unchanged_by_the_new_knobs():
    assert set(identity(Knobs(adapter="deepspeed", world_size=2, zero=3).resolved())) == {
        "adapter", "world_size", "dp", "zero"}


def test_tuned_cells_expand_to_their_candidates_within_the_same_budget():
    _, cells = parse_suite("""
name: t
defaults: {model: tiny, world_size: 2, framework_config: tuned}
matrix: {adapter: [inhouse, torch, deepspeed, colossalai], zero: [0, 1, 2, 3]}
exclude: [{adapter: colossalai, zero: 1}, {adapter: colossalai, zero: 2}, {adapter: colossalai, zero: 3}]
include: [{adapter: deepspeed, pp: 2, microbatches: 2}, {adapter: torch, pp: 2, microbatches: 2}]
""")
    groups = {}
    for c in cells:
        key = tuple(sorted((k, v) for k, v in c.knobs.resolved().items() if k != "tuning_candidate"))
        groups.setdefault(key, []).append(c.knobs.tuning_candidate)
    assert len(groups) == 15
    for key, candidates in groups.items():
        knobs = Knobs.model_validate(dict(key))
        assert sorted(candidates) == list(range(len(tuning_space(knobs)))), key
        assert 1 <= len(candidates) <= TUNING_BUDGET
        assert tuning_space(knobs)[0] == {}  # the first candidate is the default configuration
    assert max(len(c) for c in groups.values()) == TUNING_BUDGET


@pytest.mark.parametrize("entry, message", [
    ("{framework_config: tunned}", "framework_config"),
    ("{framework_config: tuned, tuning_candidate: 9}", "tuning_candidate = 9: the inhouse tuning space"),
    ("{tuning_candidate: 1}", "tuning_candidate = 1 needs framework_config = 'tuned'"),
])
def test_bad_framework_config_names_the_field(entry, message):
    with pytest.raises(SuiteError, match=message):
        parse_suite(f"name: t\ndefaults: {{model: tiny, world_size: 2}}\ninclude: [{entry}]\n")


def _rec(adapter, mode, medians, candidate=0, status="ok"):
    return {"status": status, "adapter": adapter,
            "config": {"adapter": adapter, "zero": 0, "framework_config": mode, "tuning_candidate": candidate},
            "metrics": {"step_time_median_s": medians[0], "launches": [{"median_s": m} for m in medians],
                        "step_time_s": medians} if status == "ok" else None,
            "notes": {"framework_config": {"mode": mode, "non_default": []}}}


def test_best_tuned_keeps_the_fastest_ok_candidate_per_cell():
    recs = [_rec("torch", "tuned", [3.0, 3.1], 0), _rec("torch", "tuned", [2.0, 2.2], 1),
            _rec("torch", "tuned", [1.0], 2, status="error"), _rec("torch", "default", [9.0])]
    out = best_tuned(recs)
    assert len(out) == 2
    tuned = next(r for r in out if r["config"]["framework_config"] == "tuned")
    assert tuned["tuning_result"]["candidate"] == 1
    assert (tuned["tuning_result"]["ok"], tuned["tuning_result"]["tried"]) == (2, 3)


def test_report_never_divides_across_config_modes():
    mixed = [_rec("inhouse", "default", [1.0, 1.1]), _rec("deepspeed", "theory", [2.0, 2.1])]
    assert adapter_ratio_rows(mixed) == []
    rows = adapter_ratio_rows([*mixed, _rec("deepspeed", "default", [3.0, 3.3]),
                               _rec("inhouse", "tuned", [1.0], 0), _rec("deepspeed", "tuned", [5.0], 0),
                               _rec("deepspeed", "tuned", [2.0], 1)])
    by = {(r["framework_config"].split()[0], r["adapter"]): r for r in rows}
    assert set(by) == {("default", "inhouse"), ("default", "deepspeed"), ("tuned", "inhouse"), ("tuned", "deepspeed")}
    assert by[("default", "deepspeed")]["time_ratio"] == pytest.approx(3.15 / 1.05, rel=0.05)
    assert by[("tuned", "deepspeed")]["time_ratio"] == pytest.approx(2.0)  # best candidate against best
    assert "candidate 1" in by[("tuned", "deepspeed")]["framework_config"]


SUITE = f"""
name: framework-config
steps: {STEPS}
warmup: {WARMUP}
timeout_s: 300
defaults: {{model: tiny, world_size: 2, batch_size: 8, seq_len: 32}}
matrix: {{adapter: [deepspeed], zero: [3], framework_config: [default, theory]}}
include:
  - {{adapter: deepspeed, pp: 2, microbatches: 4}}
  - {{adapter: torch, zero: 0, framework_config: tuned}}
  - {{adapter: inhouse, zero: 0, framework_config: tuned}}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    recs = run_suite(tmp_path_factory, SUITE)
    assert len(recs) == 8, [(r["adapter"], r["config"]["framework_config"], r["config"]["tuning_candidate"], r["status"]) for r in recs]
    for r in recs:
        assert r["status"] == "ok", (r["config"], r["reason"], r.get("stderr_tail"))
    return recs


def _one(recs, **knobs):
    (rec,) = [r for r in recs if all(r["config"][k] == v for k, v in knobs.items())]
    return rec


def test_deepspeed_zero3_default_vs_theory(runs):
    """Defaults keep tiny's parameters (all ≤ 1e5 elements) whole: gathered once per step
    after the update instead of twice per step, 2/3 of the ZeRO-3 volume; theory mode 1.0.
    Same training either way: the losses equal the single-process reference."""
    default = _one(runs, adapter="deepspeed", zero=3, framework_config="default")
    theory = _one(runs, adapter="deepspeed", zero=3, framework_config="theory")
    assert default["metrics"]["comm"]["all_gather"]["bytes"] == 4 * PSI
    assert theory["metrics"]["comm"]["all_gather"]["bytes"] == 2 * 4 * PSI
    for rec, ratio in ((default, 2 / 3), (theory, 1.0)):
        assert rec["theory_ratio"]["comm_bytes_per_step"] == pytest.approx(ratio, rel=0.01)
        assert rec["notes"]["comm_expected_ratio"] == pytest.approx(ratio)
    # Persistent parameters are whole on every rank beside their partition: 4Ψ + 4Ψ/N, not 4Ψ/N.
    assert 6 * PSI <= default["metrics"]["model_state_bytes"]["params"] <= 6 * PSI * 1.01
    assert theory["metrics"]["model_state_bytes"]["params"] <= 4 * PSI / 2 * 1.01
    ref = reference_losses(batch_size=8, seq_len=32, seed=0, steps=WARMUP + STEPS)
    for rec in (default, theory):
        assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(rec["metrics"]["losses"], ref))
    named = {s["setting"] for s in default["notes"]["framework_config"]["non_default"]}
    assert named == {"zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size",
                     "optimizer.params.torch_adam"}
    named = {s["setting"] for s in theory["notes"]["framework_config"]["non_default"]}
    assert {"zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
            "zero_optimization.stage3_max_reuse_distance"} <= named
    assert all(s["reason"] for s in theory["notes"]["framework_config"]["non_default"])


def test_deepspeed_pipeline_default_cut_is_deepspeeds_parameter_balance(runs):
    from deepspeed.runtime.utils import partition_balanced

    model = build_model(model_config("tiny"), 0)
    layers = [model.tok_embeddings, *model.layers]
    weights = [sum(p.numel() for p in m.parameters()) for m in layers]
    weights.append(sum(p.numel() for p in (*model.norm.parameters(), *model.output.parameters())))
    rec = _one(runs, adapter="deepspeed", pp=2)
    parts = rec["notes"]["pipeline_stage_rank0"]["parts"]
    # On `tiny` DeepSpeed's balance of parameters gives the uniform cut as well (embedding and
    # head weigh the same): the two modes train the same stages here.
    assert parts == partition_balanced(weights, 2) == [0, 3, 6]
    assert "partition_method 'parameters'" in rec["notes"]["pipeline"]


@pytest.mark.parametrize("adapter", ["torch", "inhouse"])
def test_tuned_candidates_really_apply_their_settings(runs, adapter):
    """The Ψ/8 bucket candidate all-reduces in several calls; DDP's 25 MB default in one."""
    recs = [r for r in runs if r["adapter"] == adapter]
    by = {r["config"]["tuning_candidate"]: r for r in recs}
    assert set(by) == set(range(len(recs)))
    calls = {i: r["metrics"]["comm"]["all_reduce"]["calls"] for i, r in by.items()}
    small = next(i for i, r in by.items() if "ddp.bucket_cap_mb" in r["notes"]["framework_config"]["tuning"]["overrides"])
    assert calls[0] == 1 and calls[small] >= 4, calls
    assert sum(r["metrics"]["comm_bytes_per_step"] for r in recs) == pytest.approx(
        len(recs) * by[0]["metrics"]["comm_bytes_per_step"], rel=1e-3)  # same volume, more calls
    best = best_tuned(recs)
    assert len(best) == 1 and best[0]["tuning_result"]["ok"] == len(recs)


def test_product_of_modes_is_valid_everywhere():
    for adapter, zero, mode in itertools.product(("inhouse", "torch", "deepspeed", "colossalai"), range(4),
                                                 ("default", "theory", "tuned")):
        Knobs(adapter=adapter, zero=zero, world_size=2, framework_config=mode)
