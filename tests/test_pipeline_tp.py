"""dp × tp × pp on one grid (``impl.parallel_dims.new_grid_groups``): the
in-house pipeline with every stage Megatron-sharded over the tp group — the
tp-rank-k pipelines exchange their hidden states point to point, the last
stage's loss is the vocab-parallel cross-entropy, replicas all-reduce their
stage's gradients. The two tp×pp cells of suites/model_parallel_pp.yaml run
through ``bench run``: losses against the single-process reference, every
rank's metered bytes against ``bench.theory.pp_tp_comm_by_rank``."""
from __future__ import annotations

import pytest
import yaml

from bench.theory import pp_tp_comm_by_rank
from impl.model import model_config
from impl.parallel_dims import ParallelDims
from tests.conftest import ROOT, run_suite
from tests.reference import reference_losses

CFG = model_config("tiny")


def _suite() -> str:
    """The suite file's defaults with its tp × pp cells only."""
    src = yaml.safe_load((ROOT / "suites" / "model_parallel_pp.yaml").read_text())
    src["name"] = "pipeline_tp_test"
    src.pop("matrix")
    first, *rest = [c for c in src["include"] if c.get("tp", 1) > 1]
    src["defaults"] = {**src["defaults"], **first}  # no matrix: the defaults are the first cell
    src["include"] = rest
    return yaml.safe_dump(src)


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    return {r["config"]["world_size"]: r for r in run_suite(tmp_path_factory, _suite())}


def test_cells_run_on_the_grid(recs):
    for r in recs.values():
        assert r["status"] == "ok", (r["reason"], r.get("stderr_tail"))
        assert "Megatron 1D tensor parallel over tp = 2" in r["notes"]["pipeline"]
    assert recs[8]["config"]["dp"] == 2 and "sequence parallel" in recs[8]["notes"]["pipeline"]


def test_losses_match_single_process_reference(recs):
    for r in recs.values():
        c = r["config"]
        ref = reference_losses(batch_size=c["batch_size"], seq_len=c["seq_len"], seed=0,
                               steps=len(r["metrics"]["losses"]))
        got = r["metrics"]["losses"]
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
        assert worst < 1e-5, (c["world_size"], got, ref)


def test_every_ranks_bytes_equal_theory(recs):
    for r in recs.values():
        c = r["config"]
        dims = ParallelDims(world_size=c["world_size"], dp=c["dp"], tp=c["tp"], pp=c["pp"])
        v = c["virtual_stages"] if c["pp_schedule"] == "interleaved" else 1
        theory = pp_tp_comm_by_rank(CFG, b=c["batch_size"] // c["dp"], s=c["seq_len"], tp=c["tp"], pp=c["pp"],
                                    microbatches=c["microbatches"], virtual_stages=v, dp=c["dp"],
                                    sequence_parallel=c["sequence_parallel"] == "megatron")
        measured = r["metrics"]["comm_bytes_per_step_by_rank"]
        for rank, got in enumerate(measured):
            want = theory[dims.coords(rank)[1]]
            assert abs(got / want - 1) < 0.01, (c["world_size"], rank, got, want)
        assert abs(r["theory_ratio"]["comm_bytes_per_step"] - 1) < 0.01
