"""Ring self-attention sequence parallelism (Li et al. 2021, arXiv 2105.13120):
the torchrun parity checks (tests/dist/check_ring_attention.py) and a harness
run of context-parallel cells (ring over cp, alone and composed with Megatron
TP over tp) beside a single-process cell — losses against the unsharded
reference, metered bytes against ``bench.theory.ring_sp_comm_bytes``."""
from __future__ import annotations

import json
import re

import pytest

from bench import adapters
from bench.config.knobs import Knobs, identity
from bench.config.suite import SuiteError, load_suite, parse_suite
from bench.run.results import read_records
from bench.theory import ring_sp_comm_bytes
from impl.model import model_config
from impl.model_config import total_params
from tests.conftest import ROOT, run_suite
from tests.reference import reference_losses
from tests.test_distributed_units import torchrun

CFG = model_config("tiny")
B, T, R = 8, 32, 2

SUITE = f"""
name: ring_attention_test
steps: 4
warmup: 2
timeout_s: 240
seed: 0
defaults: {{model: tiny, device: cpu, batch_size: {B}, seq_len: {T}, precision: fp32, adapter: inhouse}}
include:
  - {{world_size: 1}}
  - {{world_size: {R}, cp: {R}, sequence_parallel: ring}}
  - {{world_size: {2 * R}, cp: {R}, tp: 2, sequence_parallel: ring}}
  - {{world_size: {R}, cp: {R}, sequence_parallel: ring, attention: sliding_window, attention_block: 16}}
"""


@pytest.mark.parametrize("nproc", [2, 4])
def test_ring_attention_matches_single_process_model(nproc):
    out = torchrun("check_ring_attention.py", nproc)
    assert f"OK core ring={nproc}" in out, out
    # Activation bytes per rank (saved-tensor meter): 1/r of the single-process model's.
    ratio = float(re.search(rf"OK activations ring={nproc} per_rank/single=([0-9.]+)", out).group(1))
    assert abs(ratio * nproc - 1) < 0.02, out
    layouts = [f"ring={nproc} dp=1"] + (["ring=2 dp=2"] if nproc == 4 else [])
    for layout in layouts:
        assert f"OK model {layout}" in out, out


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    out = {}
    for r in run_suite(tmp_path_factory, SUITE):
        c = r["config"]
        key = "single" if c["sequence_parallel"] != "ring" else "ring-" + c["attention"]
        out[key + ("-tp" if c["tp"] > 1 else "")] = r
    return out


def test_statuses(recs):
    for key in ("single", "ring-dense", "ring-dense-tp"):
        assert recs[key]["status"] == "ok", (key, recs[key]["reason"], recs[key].get("stderr_tail"))
    sparse = recs["ring-sliding_window"]
    assert sparse["status"] == "unsupported" and "ring core is dense" in sparse["reason"], sparse["reason"]


def test_losses_match_reference(recs):
    ref = reference_losses(batch_size=B, seq_len=T, seed=0, steps=6)
    for key in ("single", "ring-dense", "ring-dense-tp"):
        losses = recs[key]["metrics"]["losses"]
        assert len(losses) == 6
        for a, c in zip(losses, ref):
            assert abs(a - c) <= 1e-4 * c, (key, a, c)


def test_comm_bytes_equal_ring_theory(recs):
    r = recs["ring-dense"]
    m = r["metrics"]
    want = ring_sp_comm_bytes(CFG, b=B, s=T, ring=R)
    assert abs(m["comm_bytes_per_step"] / want - 1) < 0.01, (m["comm_bytes_per_step"], want, m["comm"])
    assert r["theory"]["comm_bytes_per_step"] == pytest.approx(want, rel=1e-12)  # predict() wires the formula
    # Per kind: 3(r−1) sends per layer of one (K, V) chunk pair, (B, T/r, D) each,
    # and the replicated weights' gradient all-reduce over the r ranks.
    pair = 2 * B * (T // R) * CFG.dim * 4
    assert m["comm"]["send"]["calls"] == 3 * (R - 1) * CFG.n_layers
    assert m["comm"]["send"]["bytes"] == 3 * (R - 1) * CFG.n_layers * pair
    assert m["comm"]["all_reduce"]["bytes"] == 4 * total_params(CFG)
    assert m["comm_bytes_per_step_by_rank"] == [m["comm_bytes_per_step"]] * R


def test_cp_with_tp_bytes_equal_composed_theory(recs):
    """cp = 2 × tp = 2: the ring moves K/V of the rank's n_heads/tp heads, Megatron
    TP all-reduces its T/cp tokens' activations, and the gradients of each shard
    are averaged over its cp replicas."""
    r = recs["ring-dense-tp"]
    m = r["metrics"]
    want = ring_sp_comm_bytes(CFG, b=B, s=T, ring=R, tp=2)
    assert abs(m["comm_bytes_per_step"] / want - 1) < 0.01, (m["comm_bytes_per_step"], want, m["comm"])
    assert r["theory"]["comm_bytes_per_step"] == pytest.approx(want, rel=1e-12)
    pair = 2 * B * (T // R) * CFG.dim // 2 * 4  # the K and V chunks of half the heads
    assert m["comm"]["send"]["calls"] == 3 * (R - 1) * CFG.n_layers
    assert m["comm"]["send"]["bytes"] == 3 * (R - 1) * CFG.n_layers * pair
    # each rank holds half the weights: half the single-process model state
    single = recs["single"]["metrics"]["model_state_bytes"]
    assert m["model_state_bytes"]["params"] < 0.6 * single["params"]


def test_legacy_ring_spelling_is_read_as_cp():
    """Suites and v1 records wrote ring self-attention as tp = r: the same cell as cp = r."""
    with pytest.warns(FutureWarning, match="read as cp = 2"):
        legacy = Knobs(world_size=2, tp=2, sequence_parallel="ring")
    assert identity(legacy.resolved()) == identity(Knobs(world_size=2, cp=2, sequence_parallel="ring").resolved())
    assert (legacy.cp, legacy.tp, legacy.dims.cp) == (2, 1, 2)


def test_v1_ring_records_migrate_to_cp(tmp_path):
    common = {"suite": "old", "run_id": "r", "adapter": "inhouse", "status": "ok"}
    v1 = {**common, "schema_version": 1, "cell_id": "x", "config": {"world_size": 2, "dp": 1, "tp": 2, "pp": 1,
                                                           "sequence_parallel": "ring"}}
    other = {**common, "schema_version": 1, "cell_id": "y", "config": {"world_size": 2, "dp": 1, "tp": 2, "pp": 1,
                                                              "sequence_parallel": "megatron"}}
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(v1) + "\n" + json.dumps(other) + "\n")
    ring, megatron = read_records(path)
    assert (ring["config"]["cp"], ring["config"]["tp"]) == (2, 1)
    assert megatron["config"] == other["config"]  # only ring cells change meaning


def test_weights_replicated_and_activations_halved(recs):
    ring, single = recs["ring-dense"], recs["single"]
    assert ring["metrics"]["model_state_bytes"] == single["metrics"]["model_state_bytes"]
    assert ring["theory"]["activation_bytes_model"] == pytest.approx(single["theory"]["activation_bytes_model"] / R)
    # Same model state, half the activations per rank: the measured CPU peak is lower.
    assert ring["metrics"]["peak_mem_bytes"] < single["metrics"]["peak_mem_bytes"], (
        ring["metrics"]["peak_mem_bytes"], single["metrics"]["peak_mem_bytes"])


def test_bad_ring_knobs_name_the_field():
    import yaml

    head = {"model": "tiny", "world_size": 2, "cp": 2, "sequence_parallel": "ring"}
    for extra, field in (({"seq_len": 33}, "seq_len = 33 is not divisible by cp = 2"),
                         ({"world_size": 1, "cp": 1}, "needs cp >= 2"),
                         ({"tp_mode": "2d", "world_size": 8, "tp": 4}, "tp_mode must be '1d'"),
                         ({"sequence_parallel": "megatron", "tp": 2, "world_size": 4},
                          "cp = 2 needs sequence_parallel = 'ring'")):
        with pytest.raises(SuiteError, match=re.escape(field)):
            parse_suite(yaml.safe_dump({"name": "bad", "defaults": {**head, **extra}}))


def test_shared_suite_ring_cells_run_inhouse_only():
    _, cells = load_suite(ROOT / "suites" / "model_parallel_tp.yaml")
    ring = [c.knobs for c in cells if c.knobs.sequence_parallel == "ring" and c.knobs.attention == "dense"]
    assert {(k.cp, k.tp, k.seq_len) for k in ring} == {(2, 1, 32), (4, 1, 64), (2, 2, 32)}  # the sequence grows with the ranks
    for k in ring:
        assert adapters.why_not(k) is None, adapters.why_not(k)
    for other in ("torch", "deepspeed"):  # declared, with the reason, in their capability tables
        assert adapters.get(other).capabilities.support("sequence_parallel_ring", "cpu")
