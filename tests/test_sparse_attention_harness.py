"""Sparse attention through the real CLI: losses equal a dense-masked model's,
FLOPs count only computed blocks, and adapters that cannot run it say why."""
from __future__ import annotations

import math

import pytest

from bench.workloads.train import global_batch, optimizer_spec
from impl.model import build_model, lm_loss, model_config
from impl.model_config import matmul_params
from impl.sparse_attention import dense_masked_attention
from impl.sparse_patterns import SparsePattern, density
from tests.conftest import run_suite

SEQ, BLOCK, BATCH, STEPS, WARMUP = 128, 16, 2, 2, 1
SUITE = f"""
name: sparse-harness
steps: {STEPS}
warmup: {WARMUP}
timeout_s: 120
defaults: {{model: tiny, device: cpu, world_size: 1, batch_size: {BATCH}, seq_len: {SEQ}, attention_block: {BLOCK}}}
matrix:
  attention: [dense, sliding_window, bigbird]
include:
  - {{workload: attention, attention: sliding_window, seq_len: 256}}
  - {{adapter: torch, attention: sliding_window}}
  - {{adapter: deepspeed, attention: longformer}}
  - {{adapter: colossalai, attention: random}}
"""


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    out = {}
    for r in run_suite(tmp_path_factory, SUITE):
        c = r["config"]
        out[(r["adapter"], c["workload"], c["attention"])] = r
    return out


def _reference_losses(attention: str) -> list[float]:
    """The same decoder, data and AdamW in-process, with a dense masked SDPA core."""
    cfg = model_config("tiny")
    model = build_model(cfg, 0)
    if attention != "dense":
        pattern = SparsePattern(kind=attention, block=BLOCK)
        for block in model.layers:
            block.attention.core = lambda q, k, v: dense_masked_attention(q, k, v, pattern)
    cls, kwargs = optimizer_spec("adamw")
    opt = cls(model.parameters(), **kwargs)
    losses = []
    for step in range(WARMUP + STEPS):
        b = global_batch(cfg, batch_size=BATCH, seq_len=SEQ, seed=0, step=step)
        opt.zero_grad()
        loss = lm_loss(model(b.inputs), b.targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("attention", ["dense", "sliding_window", "bigbird"])
def test_losses_equal_the_dense_masked_model(recs, attention):
    r = recs[("inhouse", "train", attention)]
    assert r["status"] == "ok", r.get("reason")
    losses = r["metrics"]["losses"]
    assert all(math.isfinite(l) for l in losses)
    assert losses == pytest.approx(_reference_losses(attention), abs=1e-5)
    if attention != "dense":
        assert r["notes"]["attention"]["engine"] == "block_gather"


def test_flops_count_only_computed_blocks(recs):
    cfg = model_config("tiny")
    full = 12 * cfg.n_layers * cfg.dim * SEQ  # PaLM App. B's attention term at full S²
    dense = recs[("inhouse", "train", "dense")]["metrics"]
    # Dense causal attention counts its lower-triangle blocks, as a sparse pattern counts its own (#23):
    # nb(nb+1)/2 of nb² blocks at the cell's attention_block.
    nb = SEQ // dense_block(recs)
    assert dense["attention_density"] == nb * (nb + 1) / 2 / nb**2
    assert dense["flops_per_token"] - 6 * matmul_params(cfg) == pytest.approx(full * dense["attention_density"])
    assert "dense causal attention its lower-triangle blocks" in dense["attention_flops_counting"]
    for kind in ("sliding_window", "bigbird"):
        r = recs[("inhouse", "train", kind)]
        d = density(SparsePattern(kind=kind, block=BLOCK), SEQ)
        assert 0 < d < 1 and r["metrics"]["attention_density"] == d == r["notes"]["attention"]["density"]
        assert d < dense["attention_density"]  # a causal pattern computes a subset of the causal blocks
        assert r["metrics"]["flops_per_token"] - 6 * matmul_params(cfg) == pytest.approx(full * d, rel=1e-12)
        # MFU scales with FLOPs/token at equal throughput: sparse never claims dense FLOPs.
        m = r["metrics"]
        assert m["tflops_per_device"] * 1e12 == pytest.approx(m["flops_per_token"] * m["tokens_per_s"], rel=1e-9)


def dense_block(recs) -> int:
    return recs[("inhouse", "train", "dense")]["config"]["attention_block"]


def test_attention_workload_times_one_core(recs):
    r = recs[("inhouse", "attention", "sliding_window")]
    assert r["status"] == "ok", r.get("reason")
    cfg = model_config("tiny")
    d = density(SparsePattern(kind="sliding_window", block=BLOCK), 256)
    assert r["metrics"]["flops_per_token"] == pytest.approx(12 * cfg.dim * 256 * d, rel=1e-12)
    assert r["notes"]["shape_bhtd"] == [BATCH, cfg.n_heads, 256, cfg.head_dim]
    assert r["metrics"]["peak_mem_bytes"] > 0


@pytest.mark.parametrize("adapter,attention,why", [
    ("torch", "sliding_window", "no backward on CPU"),
    ("deepspeed", "longformer", "sparse_attention is removed in DeepSpeed 0.19.8"),
    ("colossalai", "random", "no sparse attention"),
])
def test_unsupported_adapters_say_why(recs, adapter, attention, why):
    r = recs[(adapter, "train", attention)]
    assert r["status"] == "unsupported" and why in r["reason"]


def test_seq_len_must_be_a_multiple_of_the_block(write_suite):
    from tests.conftest import bench

    path = write_suite("name: bad\ndefaults: {attention: sliding_window, seq_len: 100}\nmatrix: {adapter: [inhouse]}\n")
    proc = bench("validate", str(path), check=False)
    assert proc.returncode != 0
    assert "seq_len = 100 is not a multiple of attention_block = 64" in proc.stdout + proc.stderr


def test_scaling_fit_recovers_exponents():
    from bench.analysis.report.scaling_fit import fit_exponent, scaling_rows

    def rec(attention, seq, t, mem):
        return {"status": "ok", "adapter": "inhouse", "config": {"attention": attention, "seq_len": seq,
                "workload": "attention", "attention_block": 64, "attention_window": 1},
                "metrics": {"step_time_median_s": t, "peak_mem_bytes": mem}}

    lengths = [256, 1024, 4096, 8192]
    records = [rec("dense", s, 1e-8 * s**2, 10 * s) for s in lengths]
    records += [rec("sliding_window", s, 1e-5 * s, 30 * s) for s in lengths]
    rows = {r["attention"]: r for r in scaling_rows(records)}
    assert rows["dense"]["time_exponent"] == pytest.approx(2) and rows["dense"]["mem_exponent"] == pytest.approx(1)
    sw = rows["sliding_window"]
    assert sw["time_exponent_upper"] == pytest.approx(1) and sw["vs_dense_len"] == 8192
    assert sw["dense_time_ratio"] == pytest.approx(1e-8 * 8192**2 / (1e-5 * 8192))
    assert sw["dense_mem_ratio"] == pytest.approx(1 / 3)
    assert fit_exponent([1, 10], [5, 5]) == pytest.approx(0)
