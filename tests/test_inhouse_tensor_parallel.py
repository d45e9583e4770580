"""In-house 1D tensor parallelism (Megatron) and Megatron sequence parallelism:
the torchrun parity checks (tests/dist/check_tensor_parallel.py) and the
harness cells of suites/model_parallel_tp.yaml — losses against the
single-process reference and the torch adapter, metered bytes against
``bench.theory.tp_comm_bytes``, model-state bytes against the TP shard sizes."""
from __future__ import annotations

import pytest
import yaml

from bench.theory import tp_comm_bytes, tp_local_params
from impl.model import model_config
from tests.conftest import ROOT, run_suite
from tests.reference import reference_losses
from tests.test_distributed_units import torchrun


def _suite_1d() -> str:
    """The suite file with its 1D cells only: the ring cells are
    tests/test_ring_attention.py's, the 2D/2.5D/3D cells tests/test_tp_2d.py's
    and tests/test_tp_3d.py's."""
    src = yaml.safe_load((ROOT / "suites" / "model_parallel_tp.yaml").read_text())
    src["include"] = [c for c in src["include"]
                      if c.get("sequence_parallel") != "ring" and c.get("tp_mode", "1d") == "1d"]
    return yaml.safe_dump(src)


SUITE = _suite_1d()
CFG = model_config("tiny")
B, T, TP = 8, 32, 2
ACT_BYTES = B * T * CFG.dim * 4  # one fp32 (B, T, D) activation


@pytest.mark.parametrize("nproc", [2, 4])
def test_tensor_parallel_matches_unsharded_model(nproc):
    out = torchrun("check_tensor_parallel.py", nproc)
    assert f"OK linears+ce tp={nproc}" in out
    for sp in (False, True):  # one more layer adds the paper's 8bsh(t−1)/t (Narayanan et al. 2021 §3)
        assert f"OK layer increment tp={nproc} sp={sp}" in out, out
    layouts = [f"tp={nproc} dp=1"] + (["tp=2 dp=2"] if nproc == 4 else [])
    for layout in layouts:
        for sp in (False, True):
            assert f"OK model {layout} sp={sp}" in out, out


def _label(c: dict) -> str:
    label = f"{c['adapter']}-" + (f"dp{c['dp']}-" if c["dp"] > 1 else "") + f"tp{c['tp']}" + ("-sp" if c["sequence_parallel"] != "none" else "")
    return label + ("-" + c["optimizer"] if c["optimizer"] != "adamw" else "")


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    return {_label(r["config"]): r for r in run_suite(tmp_path_factory, SUITE)}


OK = ("inhouse-tp2", "inhouse-tp2-sp", "torch-tp2", "torch-tp2-sp", "inhouse-dp2-tp2-sp")


def test_statuses(recs):
    assert set(recs) == set(OK) | {"inhouse-tp2-lamb"}
    for key in OK:
        assert recs[key]["status"] == "ok", (key, recs[key]["reason"], recs[key].get("stderr_tail"))
    lamb = recs["inhouse-tp2-lamb"]
    assert lamb["status"] == "unsupported" and "not element-wise" in lamb["reason"], lamb["reason"]


def test_losses_match_reference_and_torch(recs):
    ref = reference_losses(batch_size=B, seq_len=T, seed=0, steps=6)
    for sp in ("", "-sp"):
        mine, theirs = (recs[f"{a}-tp2{sp}"]["metrics"]["losses"] for a in ("inhouse", "torch"))
        assert len(mine) == 6
        for a, b, c in zip(mine, theirs, ref):
            assert abs(a - c) <= 1e-4 * c, (sp, a, c)
            assert abs(a - b) <= 1e-4 * b, (sp, a, b)
    for a, c in zip(recs["inhouse-dp2-tp2-sp"]["metrics"]["losses"], ref):
        assert abs(a - c) <= 1e-4 * c, ("dp2", a, c)


@pytest.mark.parametrize("sp", [False, True])
def test_comm_bytes_equal_megatron_theory(recs, sp):
    r = recs["inhouse-tp2" + ("-sp" if sp else "")]
    m = r["metrics"]
    want = tp_comm_bytes(CFG, b=B, s=T, tp=TP, sequence_parallel=sp)
    assert abs(m["comm_bytes_per_step"] / want - 1) < 0.01, (m["comm_bytes_per_step"], want, m["comm"])
    assert abs(r["theory"]["comm_bytes_per_step"] / want - 1) < 1e-9  # predict() wires the same formula
    # Per kind: 4L+2 (B, T, D) activations, plus 3 fp32 values per token for the
    # vocab-parallel loss (never the (B, T, V) logits), plus under SP the 2L+1
    # norm-weight gradients.
    n_act, ce, norms = 4 * CFG.n_layers + 2, 3 * B * T * 4, (2 * CFG.n_layers + 1) * CFG.dim * 4
    if sp:
        assert m["comm"]["all_gather"]["bytes"] == m["comm"]["reduce_scatter"]["bytes"] == n_act * ACT_BYTES
        assert m["comm"]["all_reduce"]["bytes"] == ce + norms
    else:
        assert set(m["comm"]) == {"all_reduce"}
        assert m["comm"]["all_reduce"]["bytes"] == n_act * ACT_BYTES + ce


def test_data_parallel_on_top_adds_the_shard_all_reduce(recs):
    # Each replica runs TP on B/2 sequences; the dp all-reduce carries this
    # rank's gradient shards, 2Ψ_tp(N_d−1)/N_d (the bucketed all-reduce).
    r = recs["inhouse-dp2-tp2-sp"]
    m = r["metrics"]
    want = tp_comm_bytes(CFG, b=B // 2, s=T, tp=TP, dp=2, sequence_parallel=True)
    assert abs(m["comm_bytes_per_step"] / want - 1) < 0.01, (m["comm_bytes_per_step"], want, m["comm"])
    assert m["comm"]["all_reduce"]["group_sizes"] == [2]
    assert m["comm_bytes_per_step_by_rank"] == [m["comm_bytes_per_step"]] * 4
    assert m["model_state_bytes"]["params"] == 4 * tp_local_params(CFG, TP)


def test_sequence_parallel_moves_the_same_activation_bytes(recs):
    # Korthikanti et al. 2022 §4.2.2: all-gather + reduce-scatter in place of
    # each all-reduce, same bus bytes; SP adds only the norm-gradient all-reduce.
    tp, sp = (recs[k]["metrics"] for k in ("inhouse-tp2", "inhouse-tp2-sp"))
    norms_bus = (2 * CFG.n_layers + 1) * CFG.dim * 4 * 2 * (TP - 1) / TP
    assert sp["comm_bytes_per_step"] == pytest.approx(tp["comm_bytes_per_step"] + norms_bus, rel=1e-12)


def test_megatron_loss_moves_less_than_gathered_logits(recs):
    # The torch plan all-gathers the (B, T, V) logits; the vocab-parallel loss
    # all-reduces 3 values per token instead — the rest of the traffic is equal.
    logits_bus = B * T * CFG.vocab_size * 4 * (TP - 1) / TP
    ce_bus = 3 * B * T * 4 * 2 * (TP - 1) / TP
    for sp in ("", "-sp"):
        mine, theirs = (recs[f"{a}-tp2{sp}"]["metrics"]["comm_bytes_per_step"] for a in ("inhouse", "torch"))
        assert theirs - mine == pytest.approx(logits_bus - ce_bus, rel=1e-9), (sp, mine, theirs)


def test_model_state_is_split_by_tp(recs):
    psi_tp = tp_local_params(CFG, TP)
    for key in ("inhouse-tp2", "inhouse-tp2-sp"):
        r = recs[key]
        state, theory = r["metrics"]["model_state_bytes"], r["theory"]["model_state_bytes"]
        assert state["params"] == state["grads"] == 4 * psi_tp
        # AdamW: two fp32 moments per shard element, plus one step counter per tensor.
        n_tensors = 9 * CFG.n_layers + 3  # embedding, 2 norms + 7 linears per block, norm, head
        assert state["optimizer"] == 8 * psi_tp + 4 * n_tensors
        for k in ("params", "grads", "optimizer"):
            assert abs(state[k] / theory[k] - 1) < 0.01, (key, k, state, theory)
