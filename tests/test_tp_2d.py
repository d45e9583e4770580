"""In-house 2D (SUMMA) and 2.5D (Tesseract) tensor parallelism: the torchrun
parity checks (tests/dist/check_tp_2d.py: 2 × 2 at 4 ranks; 2 × 2 × 2 and
2 × 2 × dp 2 at 8 ranks) and the 2D cell of suites/model_parallel_tp.yaml
through `bench run` — losses against the single-process reference, metered
bytes against ``bench.theory.tp2d_comm_bytes``, model state against the blocks."""
from __future__ import annotations

import math
import re

import pytest
import yaml

from bench.adapters.inhouse.tp2d import why_not_tp2d
from bench.config.knobs import Knobs
from bench.theory import tp2d_comm_bytes, tp2d_param_shapes
from impl.model import model_config
from tests.conftest import ROOT, run_suite
from tests.reference import reference_losses
from tests.test_distributed_units import torchrun

CFG = model_config("tiny")
B, T = 8, 32  # the suite's defaults


@pytest.mark.parametrize("nproc, layouts", [
    (4, ["tp=4 depth=1 dp=1"]),
    (8, ["tp=8 depth=2 dp=1", "tp=4 depth=1 dp=2"]),
])
def test_matches_unsharded_model(nproc, layouts):
    out = torchrun("check_tp_2d.py", nproc)
    assert f"OK summa linear world={nproc}" in out, out
    for layout in layouts:
        line = re.search(rf"OK model {layout} (.*)", out)
        assert line, out
        assert "comm_ratio=1.000000" in line.group(1), line.group(1)


def _suite() -> str:
    """The suite file's defaults with its 2D cell only (the rest of the file is
    tests/test_inhouse_tensor_parallel.py's and tests/test_ring_attention.py's)."""
    src = yaml.safe_load((ROOT / "suites" / "model_parallel_tp.yaml").read_text())
    (cell,) = [c for c in src["include"] if c.get("tp_mode") == "2d"]
    keep = {k: src[k] for k in ("steps", "warmup", "timeout_s", "seed")}
    return yaml.safe_dump({"name": "tp_2d_test", **keep, "defaults": {**src["defaults"], **cell}})


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    (r,) = run_suite(tmp_path_factory, _suite())
    assert r["status"] == "ok", (r["reason"], r.get("stderr_tail"))
    return r


def test_losses_match_reference(rec):
    ref = reference_losses(batch_size=B, seq_len=T, seed=0, steps=6)
    losses = rec["metrics"]["losses"]
    assert len(losses) == 6
    for a, b in zip(losses, ref):
        assert abs(a - b) <= 1e-5 * b, (losses, ref)


def test_comm_bytes_equal_summa_theory(rec):
    m = rec["metrics"]
    want = tp2d_comm_bytes(CFG, b=B, s=T, tp=4)
    assert abs(m["comm_bytes_per_step"] / want - 1) < 0.01, (m["comm_bytes_per_step"], want, m["comm"])
    assert rec["theory"]["comm_bytes_per_step"] == pytest.approx(want, rel=1e-12)
    assert abs(rec["theory_ratio"]["comm_bytes_per_step"] - 1) < 0.01
    # Every collective runs inside a row or a column of the 2 × 2 grid.
    for kind in ("all_gather", "reduce_scatter", "all_reduce"):
        assert m["comm"][kind]["group_sizes"] == [2], m["comm"]
    # All ranks of the grid move the same bytes.
    assert m["comm_bytes_per_step_by_rank"] == [m["comm_bytes_per_step"]] * 4


def test_model_state_is_split_by_q_squared(rec):
    psi_rank = sum(math.prod(s) for s in tp2d_param_shapes(CFG, 4).values())
    # Matrices and the embedding ÷ q², the 2L+1 norm vectors ÷ q.
    n_norms = 2 * CFG.n_layers + 1
    assert psi_rank == (sum(math.prod(s) for s in tp2d_param_shapes(CFG, 1).values()) - n_norms * CFG.dim) / 4 \
        + n_norms * CFG.dim / 2
    state, theory = rec["metrics"]["model_state_bytes"], rec["theory"]["model_state_bytes"]
    assert state["params"] == state["grads"] == 4 * psi_rank
    for k in ("params", "grads", "optimizer"):
        assert abs(state[k] / theory[k] - 1) < 0.01, (k, state, theory)


def test_2p5d_volume_is_2d_on_each_depth_layer_plus_the_depth_sums():
    # Same grid on half the batch, plus the loss mean and the gradients over depth = 2.
    psi_rank = sum(math.prod(s) for s in tp2d_param_shapes(CFG, 8, depth=2).values())
    want = tp2d_comm_bytes(CFG, b=B // 2, s=T, tp=4) + 2 * (1 / 2) * (4 + 4 * psi_rank)
    assert tp2d_comm_bytes(CFG, b=B, s=T, tp=8, depth=2) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("knobs, field", [
    (dict(world_size=4, tp=4, tp_mode="2d", batch_size=5), "batch_size"),
    (dict(world_size=8, tp=8, tp_mode="2.5d", tp_depth=2, batch_size=4, microbatches=2), "batch_size"),
    (dict(world_size=8, tp=8, tp_mode="2.5d", tp_depth=8), "q must be >= 2"),
    (dict(world_size=9, tp=9, tp_mode="2d", batch_size=9), "n_heads"),
])
def test_bad_grid_is_refused_naming_the_field(knobs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        Knobs(adapter="inhouse", model="tiny", device="cpu", seq_len=32, **{"batch_size": 8, **knobs})


def test_unsupported_combinations_say_why():
    base = dict(adapter="inhouse", model="tiny", device="cpu", world_size=4, tp=4, tp_mode="2d", batch_size=8)
    assert why_not_tp2d(Knobs(**base)) is None
    assert "not element-wise" in why_not_tp2d(Knobs(**base, optimizer="lamb"))
    assert "fp32 only" in why_not_tp2d(Knobs(**base, precision="bf16"))
    assert "zero" in why_not_tp2d(Knobs(**{**base, "world_size": 8, "dp": 2, "zero": 1}))
