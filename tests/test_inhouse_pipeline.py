"""In-house pipeline parallelism (impl/pipeline.py, impl/pipeline_schedules.py).

* Single-process units: the partitioner, the schedule orders (each op once,
  causal, activations held), the p2p theory, the adapter's declared limits.
* torchrun (tests/dist/check_pipeline.py): GPipe, 1F1B and interleaved equal
  single-process AdamW after several steps; PipeDream equals its simulation.
* Harness (suites/model_parallel_pp.yaml through the real CLI): losses equal
  the single-process reference and the torch adapter's same cells; the metered
  point-to-point bytes equal the theory; activation counts per rank; the
  measured bubble is recorded beside (p−1)/m.
"""
from __future__ import annotations

import math

import pytest

from bench.knobs import Knobs
from bench.theory import bubble_fraction, pipeline_p2p_bytes
from impl.model import build_model, model_config
from impl.pipeline import partition_layers, partition_model
from impl.pipeline_schedules import gpipe_order, interleaved_order, one_f_one_b_order, pipedream_order
from tests.conftest import ROOT, run_suite
from tests.reference import reference_losses
from tests.test_distributed_units import torchrun

SUITE = (ROOT / "suites" / "model_parallel_pp.yaml").read_text()
CFG = model_config("tiny")
B, T, M = 8, 32, 4
MB_BYTES = B // M * T * CFG.dim * 4  # one fp32 (b/m, T, D) hidden state


# --- units -----------------------------------------------------------------------------------


def test_partition_minimises_the_largest_stage():
    assert partition_layers([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    # A heavy head pushes blocks forward; a heavy embedding pushes them back.
    assert partition_layers([1, 1, 1, 1], 2, last_extra=2) == [range(0, 3), range(3, 4)]
    assert partition_layers([1, 1, 1, 1], 2, first_extra=2) == [range(0, 1), range(1, 4)]
    assert partition_layers([5, 1, 1, 1, 1, 5], 3) == [range(0, 1), range(1, 5), range(5, 6)]
    import itertools

    costs = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    parts = partition_layers(costs, 4, first_extra=2, last_extra=4)
    assert [i for r in parts for i in r] == list(range(10)) and all(len(r) for r in parts)

    def worst(bounds):
        edges = (0, *bounds, len(costs))
        loads = [sum(costs[edges[s]:edges[s + 1]]) for s in range(4)]
        return max(loads[0] + 2, *loads[1:3], loads[3] + 4)

    brute = min(worst(b) for b in itertools.combinations(range(1, 10), 3))
    assert worst((parts[1].start, parts[2].start, parts[3].start)) == brute
    with pytest.raises(ValueError):
        partition_layers([1, 1], 3)


def test_partition_by_params_and_by_time_cover_the_model():
    model = build_model(CFG, seed=0)
    # Embedding (V·D) ≈ head (V·D): the tiny model splits 2 + 2 by parameters.
    assert partition_model(model, 2) == [range(0, 2), range(2, 4)]
    import torch

    tokens = torch.randint(0, CFG.vocab_size, (2, 16))
    parts = partition_model(model, 2, balance="time", sample=(tokens, tokens))
    assert [i for r in parts for i in r] == [0, 1, 2, 3]
    assert all(p.grad is None for p in model.parameters())


def _replay(order, m):
    """Each (micro, chunk) forwarded once and backwarded once, after its forward; max held."""
    seen, held, peak = set(), 0, 0
    for op, micro, c in order:
        if op == "F":
            assert (micro, c) not in seen
            seen.add((micro, c))
            held += 1
            peak = max(peak, held)
        else:
            assert (micro, c) in seen
            held -= 1
    return len(seen), peak


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8), (2, 1)])
def test_orders_hold_m_for_gpipe_and_at_most_p_for_1f1b(p, m):
    for r in range(p):
        assert _replay(gpipe_order(m, p, r), m) == (m, m)
        n, peak = _replay(one_f_one_b_order(m, p, r), m)
        assert n == m and peak == min(p - r, m) <= p


def test_interleaved_order_is_megatrons():
    p, v, m = 2, 2, 4
    # Forwards: micro-batches 0,1 through chunk 0, then 0,1 through chunk 1, then 2,3 …
    f = [(mb, c) for op, mb, c in interleaved_order(m, p, 0, v) if op == "F"]
    assert f == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    b = [(mb, c) for op, mb, c in interleaved_order(m, p, 0, v) if op == "B"]
    assert b[:2] == [(0, 1), (1, 1)]  # backward starts from the last chunk
    for r in range(p):
        assert _replay(interleaved_order(m, p, r, v), m) == (m * v, 2 * (p - r - 1) + (v - 1) * p + 1)
    with pytest.raises(ValueError):
        interleaved_order(3, 2, 0, 2)


def test_pipedream_stream_lags_backward_by_p_minus_r_minus_1():
    p, m = 4, 4
    for r in range(p):
        w = p - r - 1
        ops = [op for s in range(3) for op in pipedream_order(s, m, p, r)]
        assert [mb for op, mb, _ in ops if op == "F"] == list(range(3 * m))
        assert [mb for op, mb, _ in ops if op == "B"] == list(range(3 * m - w))
        # Every backward follows the forward w micro-batches later (steady 1F1B).
        for i, (op, mb, _) in enumerate(ops):
            if op == "B":
                assert ops[i - 1] == ("F", mb + w, 0)


def test_p2p_theory():
    # pp = 2: rank 0 sends m hidden states, rank 1 m gradients.
    assert pipeline_p2p_bytes(pp=2, microbatches=M, micro_batch=B // M, seq_len=T, dim=CFG.dim) == [M * MB_BYTES] * 2
    # pp = 4: middle ranks send both directions.
    assert pipeline_p2p_bytes(pp=4, microbatches=M, micro_batch=2, seq_len=T, dim=CFG.dim) == [
        M * MB_BYTES, 2 * M * MB_BYTES, 2 * M * MB_BYTES, M * MB_BYTES]
    # Interleaved, loop placement (stages 0, 2 | 1, 3): 2v−1 messages per micro-batch at the ends.
    assert pipeline_p2p_bytes(pp=2, microbatches=M, micro_batch=2, seq_len=T, dim=CFG.dim, virtual_stages=2) == [
        3 * M * MB_BYTES] * 2
    assert bubble_fraction(2, 4, "interleaved", 2) == 0.125 and bubble_fraction(4, 8, "1f1b") == 3 / 8


@pytest.mark.parametrize("over, why", [
    ({"world_size": 4, "tp": 2}, "tp = 2 with pp"),
    ({"zero": 1}, "zero = 1 with pp"),
    ({"precision": "bf16"}, "precision = bf16"),
    ({"pp_schedule": "interleaved", "virtual_stages": 2, "microbatches": 3, "batch_size": 6}, "divisible by pp"),
    ({"pp_schedule": "zbv"}, "pipeline_zbv"),
])
def test_declared_limits(over, why):
    from bench.adapters import get

    knobs = Knobs(**{"adapter": "inhouse", "world_size": 2, "pp": 2, "microbatches": 4, **over})
    reason = get("inhouse").why_not(knobs)
    assert reason and why in reason, reason


def test_supported_cells_have_no_reason():
    from bench.adapters import get

    for schedule in ("gpipe", "1f1b", "pipedream"):
        assert get("inhouse").why_not(Knobs(world_size=2, pp=2, microbatches=4, pp_schedule=schedule)) is None
    assert get("inhouse").why_not(Knobs(world_size=4, pp=2, microbatches=4)) is None  # dp 2 × pp 2


# --- torchrun --------------------------------------------------------------------------------


@pytest.mark.parametrize("nproc, expect", [(2, 7), (4, 8)])
def test_schedules_equal_single_process_reference_under_torchrun(nproc, expect):
    # 2 ranks: gpipe, 1f1b, interleaved × m ∈ {4, 8} + pipedream; 4 ranks: gpipe, 1f1b × m ∈ {4, 8}
    # at pp = 4, pipedream at pp = 4, and gpipe, 1f1b, interleaved (m = 4) at dp 2 × pp 2.
    out = torchrun("check_pipeline.py", nproc)
    assert out.count("OK ") == expect, out
    assert "OK pipedream" in out


# --- harness ---------------------------------------------------------------------------------


def _label(c: dict) -> str:
    return f"{c['adapter']}-{c['pp_schedule']}" + (f"-dp{c['dp']}" if c["dp"] > 1 else "")


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    out = {_label(r["config"]): r for r in run_suite(tmp_path_factory, SUITE)}
    assert len(out) == 8
    for key, r in out.items():
        assert r["status"] == "ok", (key, r.get("reason"), r.get("stderr_tail"))
    return out


SYNC = ("gpipe", "1f1b", "interleaved")


def test_synchronous_schedules_match_reference_and_torch(recs):
    ref = reference_losses(batch_size=B, seq_len=T, seed=0, steps=6)
    for key in [f"inhouse-{s}" for s in SYNC] + ["inhouse-1f1b-dp2"]:
        losses = recs[key]["metrics"]["losses"]
        assert len(losses) == 6
        for a, b in zip(losses, ref):
            assert abs(a - b) <= 1e-4 * b, (key, a, b)
    for s in SYNC:
        for a, b in zip(recs[f"inhouse-{s}"]["metrics"]["losses"], recs[f"torch-{s}"]["metrics"]["losses"]):
            assert abs(a - b) <= 1e-4 * b, (s, a, b)


def test_pipedream_is_asynchronous_and_stays_close(recs):
    # One update per micro-batch with stale weights: not the synchronous trajectory
    # (exact agreement with its simulation is checked under torchrun), but close to it.
    ref = reference_losses(batch_size=B, seq_len=T, seed=0, steps=6)
    losses = recs["inhouse-pipedream"]["metrics"]["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert max(abs(a - b) / b for a, b in zip(losses, ref)) > 1e-4
    assert max(abs(a - b) / b for a, b in zip(losses, ref)) < 0.02
    assert abs(losses[0] - ref[0]) < 1e-3 * ref[0]  # step 0: only later micro-batches see updates


def test_point_to_point_bytes_equal_theory(recs):
    for s in (*SYNC, "pipedream"):
        m = recs[f"inhouse-{s}"]
        theory = m["theory"]["comm_bytes_per_step"]
        assert abs(m["metrics"]["comm_bytes_per_step"] / theory - 1) < 0.01, (s, m["metrics"]["comm_bytes_per_step"], theory)
        v = 2 if s == "interleaved" else 1
        assert m["metrics"]["comm_bytes_per_step_by_rank"] == pipeline_p2p_bytes(
            pp=2, microbatches=M, micro_batch=B // M, seq_len=T, dim=CFG.dim, virtual_stages=v)
        assert set(m["metrics"]["comm"]) == {"send", "recv"}
        # The same messages as torch.distributed.pipelining's schedule.
        if s in SYNC:
            assert m["metrics"]["comm"] == {k: {**v_, "time_s": m["metrics"]["comm"][k]["time_s"]}
                                            for k, v_ in recs[f"torch-{s}"]["metrics"]["comm"].items()}


def test_dp_by_pp_adds_one_gradient_all_reduce_per_stage(recs):
    r = recs["inhouse-1f1b-dp2"]["metrics"]
    model = build_model(CFG, seed=0)
    parts = partition_model(model, 2)
    per_block = sum(p.numel() for p in model.layers[0].parameters())
    stage_params = [model.tok_embeddings.weight.numel() + len(parts[0]) * per_block,
                    len(parts[1]) * per_block + CFG.dim + model.output.weight.numel()]
    # Each replica's micro-batch is b/(dp·m) = 1 row; all-reduce bus factor 2(n−1)/n = 1 at n = 2.
    p2p = M * (B // 2 // M) * T * CFG.dim * 4
    want = [p2p + 4 * stage_params[pp_rank] for pp_rank in (0, 1, 0, 1)]
    assert r["comm_bytes_per_step_by_rank"] == want
    assert r["comm"]["all_reduce"]["calls"] == 1


def test_activations_held_and_bubble_recorded(recs):
    held = {"gpipe": {"0": M, "1": M}, "1f1b": {"0": 2, "1": 1}, "interleaved": {"0": 5, "1": 3},
            "pipedream": {"0": 2, "1": 1}, "1f1b-dp2": {"0": 2, "1": 1, "2": 2, "3": 1}}
    for s, want in held.items():
        notes = recs[f"inhouse-{s}"]["notes"]
        assert notes["pipeline_schedule"] == s.split("-")[0]
        assert notes["max_in_flight_by_rank"] == want, (s, notes["max_in_flight_by_rank"])
        assert notes["bubble_ranks_reported"] == len(want)
    for s in SYNC:
        notes = recs[f"inhouse-{s}"]["notes"]
        v = 2 if s == "interleaved" else 1
        assert notes["bubble_theory"] == (2 - 1) / (v * M)
        # CPU timing: only a sanity band — some idle time, less than the step itself.
        assert 0 < notes["bubble_measured"] < 1.5, (s, notes["bubble_measured"])
        for rank in ("0", "1"):
            timeline = notes["pipeline_by_rank"][rank]["timeline_last_step"]
            assert len(timeline) == 2 * M * v
