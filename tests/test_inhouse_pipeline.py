"""In-house pipeline parallelism (impl/pipeline.py, impl/pipeline_schedules.py).

* Single-process units: the partitioner, the schedule orders (each op once,
  causal, activations held), the p2p theory, the adapter's declared limits.
* torchrun (tests/dist/check_pipeline.py): GPipe, 1F1B and interleaved equal
  single-process AdamW after several steps; PipeDream equals its simulation.
* Harness (suites/model_parallel_pp.yaml through the real CLI, plus one
  ``pp_balance: time`` cell): losses equal the single-process reference and the
  torch adapter's same cells; the metered point-to-point bytes equal the
  theory; activation counts per rank and 1F1B's peak memory ≤ GPipe's (m > p);
  the recorded timelines follow the schedule's order and the recorded bubble
  is the one those timelines give.
* Bubble (impl/pipeline_bubble.py): the communication-free replay of every
  schedule's orders at equal stage times is exactly (p−1)/m, (p−1)/(v·m)
  interleaved. Measured ÷ theory within 10 % (suites/pipeline_bubble.yaml) is
  a timing claim: ``calibration`` marker, run nightly on a quiet machine.
"""
from __future__ import annotations

import math
import statistics

import pytest

from bench.config.knobs import Knobs
from bench.theory import bubble_fraction, pipeline_p2p_bytes
from impl.model import build_model, model_config
from impl.pipeline import partition_layers, partition_model
from impl.pipeline_bubble import bubble, busy_s, replay, replay_bubble, span_s, stage_durations
from impl.pipeline_schedules import gpipe_order, interleaved_order, one_f_one_b_order, pipedream_order, sync_order
from tests.conftest import ROOT, run_suite
from tests.reference import reference_losses
from tests.test_distributed_units import torchrun

# The suite file without its tp × pp cells (tests/test_pipeline_tp.py runs those).
SUITE = "".join(line for line in (ROOT / "suites" / "model_parallel_pp.yaml").read_text().splitlines(keepends=True)
                if "tp: 2" not in line)
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


def test_time_balance_moves_blocks_off_a_heavy_head():
    # A 16k vocabulary: embedding and head each hold ~20 blocks' parameters, so the parameter
    # cut is symmetric; but the lookup costs ~nothing and the head + loss several blocks' time,
    # so the time cut gives stage 0 more blocks.
    import torch

    model = build_model(model_config("tiny", vocab_size=16384, n_layers=8), seed=0)
    tokens = torch.randint(0, 16384, (2, 32))
    by_params = partition_model(model, 2)
    by_time = partition_model(model, 2, balance="time", sample=(tokens, tokens))
    assert by_params == [range(0, 4), range(4, 8)]
    assert len(by_time[0]) > len(by_params[0]) and by_time[1].stop == 8, by_time


@pytest.mark.parametrize("over, why", [
    ({"pp_balance": "flops"}, "pp_balance"),
    ({"pp_balance": "time", "pp": 1, "world_size": 1, "microbatches": 1}, "pp_balance = 'time' needs pp >= 2"),
    ({"pp_balance": "time", "adapter": "torch"}, "adapter 'inhouse'"),
])
def test_pp_balance_knob_is_validated(over, why):
    with pytest.raises(ValueError, match=why):
        Knobs(**{"world_size": 2, "pp": 2, "microbatches": 4, **over})


def _orders(schedule, m, p, v=1):
    return [sync_order(schedule, m, p, r, v) for r in range(p)]


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("m", [4, 8, 12])
def test_replay_at_equal_stage_times_is_the_papers_bubble(p, m):
    # Forward 1, backward 2 per stage (per chunk: ÷ v); free communication.
    for schedule in ("gpipe", "1f1b"):
        orders = _orders(schedule, m, p)
        assert replay_bubble(orders, stage_durations(orders, [1.0] * p, [2.0] * p)) == pytest.approx(
            bubble_fraction(p, m, schedule), rel=1e-12)
    if m % p == 0:
        orders = _orders("interleaved", m, p, 2)
        assert replay_bubble(orders, stage_durations(orders, [0.5] * 2 * p, [1.0] * 2 * p)) == pytest.approx(
            bubble_fraction(p, m, "interleaved", 2), rel=1e-12)


def test_replay_with_a_slow_stage_stops_falling_as_one_over_m():
    # Stage 1 takes 1.5× stage 0: the bubble tends to p·max/Σ − 1 = 0.2 instead of (p−1)/m → 0.
    for schedule in ("gpipe", "1f1b"):
        small, large = (replay_bubble(o, stage_durations(o, [1.0, 1.5], [2.0, 3.0]))
                        for o in (_orders(schedule, 4, 2), _orders(schedule, 400, 2)))
        assert small > bubble_fraction(2, 4, schedule) and 0.2 < large < 0.2 + 2 / 400
    # Causality: a backward never starts before the next stage's backward of that micro-batch ends.
    lanes = replay(_orders("1f1b", 4, 2), stage_durations(_orders("1f1b", 4, 2), [1.0, 1.5], [2.0, 3.0]))
    end = {(op, mb, r): e for r, lane in enumerate(lanes) for op, mb, _, _, e in lane}
    assert all(s >= end[("B", mb, 1)] for op, mb, _, s, _ in lanes[0] if op == "B")
    with pytest.raises(ValueError, match="deadlock"):
        replay([[("B", 0, 0), ("F", 0, 0)], [("F", 0, 0), ("B", 0, 0)]], [[1.0, 1.0], [1.0, 1.0]])


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
    ({"world_size": 4, "tp": 2, "pp_schedule": "pipedream"}, "tp = 2 with pp"),
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
    return (f"{c['adapter']}-{c['pp_schedule']}" + (f"-dp{c['dp']}" if c["dp"] > 1 else "")
            + ("-time" if c.get("pp_balance", "params") != "params" else ""))


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    # One more cell than the suite file: 1F1B cut by measured time.
    suite = SUITE.rstrip() + "\n  - {pp_schedule: 1f1b, pp_balance: time}\n"
    out = {_label(r["config"]): r for r in run_suite(tmp_path_factory, suite)}
    assert len(out) == 9
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
        # CPU timing: some idle time was measured. No upper bound: an absolute bound on a
        # timing fails under load (1.59 and 1.94 with another process on the 2 cores); the
        # timeline test below checks the recorded bubble against the recorded timeline.
        assert notes["bubble_measured"] > 0, (s, notes["bubble_measured"])
        for rank in ("0", "1"):
            timeline = notes["pipeline_by_rank"][rank]["timeline_last_step"]
            assert len(timeline) == 2 * M * v
    # 1F1B holds min(p − r, m) micro-batches, GPipe m: with m > p its measured peak is no higher.
    assert recs["inhouse-1f1b"]["metrics"]["peak_mem_bytes"] <= recs["inhouse-gpipe"]["metrics"]["peak_mem_bytes"]


def test_timelines_follow_the_schedule_and_give_the_recorded_bubble(recs):
    for key in [f"inhouse-{s}" for s in SYNC] + ["inhouse-1f1b-dp2", "inhouse-1f1b-time"]:
        notes = recs[key]["notes"]
        grid, by_rank = notes["pipeline_grid"], notes["pipeline_by_rank"]
        pp, v, step = grid["pp"], grid["virtual_stages"], notes["pipeline_timeline_step"]
        lanes = {int(r): [tuple(e) for e in s["timeline_last_step"]] for r, s in by_rank.items()}
        for rank, lane in lanes.items():
            # The op order executed is the schedule's, and ops never overlap on a rank.
            assert [e[:3] for e in lane] == sync_order(grid["schedule"], M, pp, rank % pp, v), (key, rank)
            assert all(a[4] <= b[3] for a, b in zip(lane, lane[1:]))
            # Busy time of the lane is the step's recorded busy time (idle = span − busy).
            assert busy_s(lane) == pytest.approx(by_rank[str(rank)]["busy_s"][step], rel=1e-9)
            assert span_s(lane) == pytest.approx(by_rank[str(rank)]["span_s"][step], rel=1e-9)
        # The recorded bubble is Σ idle ÷ Σ busy with stage 0's span, median over steps 1…n−1, mean
        # over replicas; the stage theory is the replay of the same orders at the recorded op times.
        measured, theory = [], []
        for d in range(grid["dp"]):
            ranks = [str(d * pp + i) for i in range(pp)]
            n = min(len(by_rank[r]["busy_s"]) for r in ranks)
            orders = [sync_order(grid["schedule"], M, pp, i, v) for i in range(pp)]
            per_step = [bubble(by_rank[ranks[0]]["span_s"][k], [by_rank[r]["busy_s"][k] for r in ranks])
                        for k in range(1, n)]
            ideal = [replay_bubble(orders, [by_rank[r]["op_s_recent"][str(k)] for r in ranks]) for k in range(1, n)]
            measured.append(statistics.median(per_step))
            theory.append(statistics.median(ideal))
        assert notes["bubble_measured"] == pytest.approx(sum(measured) / len(measured), rel=1e-9), key
        assert notes["bubble_stage_theory"] == pytest.approx(sum(theory) / len(theory), rel=1e-9), key
        assert notes["bubble_measured_over_theory"] == pytest.approx(notes["bubble_measured"] / notes["bubble_theory"])
        # The replay is communication-free and keeps every op's duration: it cannot idle more than
        # the run did, beyond clock rounding.
        assert notes["bubble_stage_theory"] <= notes["bubble_measured"] + 1e-6, key


def test_time_balanced_cell_cuts_by_the_times_rank_0_measured(recs):
    r = recs["inhouse-1f1b-time"]
    t = r["notes"]["pipeline_piece_times_s"]
    assert len(t["blocks"]) == CFG.n_layers and t["head"] > t["embedding"] > 0
    want = partition_layers(t["blocks"], 2, first_extra=t["embedding"], last_extra=t["head"])
    assert r["notes"]["pipeline_partition"] == [list(x) for x in want]
    assert r["notes"]["pipeline_balance"] == "time"
    # The cut changes where blocks run, never the math.
    for a, b in zip(r["metrics"]["losses"], recs["inhouse-1f1b"]["metrics"]["losses"]):
        assert abs(a - b) <= 1e-5 * b


# --- the bubble against theory (timing: nightly) ----------------------------------------------


@pytest.mark.calibration
def test_bubble_within_ten_percent_of_theory_for_the_measured_stage_times(tmp_path_factory):
    """suites/pipeline_bubble.yaml at pp = 2 (one rank per core): GPipe and 1F1B at m = 4, 8,
    interleaved v = 2 at m = 4, and 1F1B cut by time. Each cell's ratio comes from that one run's
    timelines. The `small` preset's 4 blocks cannot be cut into equal stages (the head + loss
    costs about one block), so (p−1)/m is printed, not asserted; the theory for the measured
    stage times must hold within 10 %."""
    from bench.analysis.report.pipeline import pipeline_bubble_rows

    text = (ROOT / "suites" / "pipeline_bubble.yaml").read_text()
    text = "\n".join(line for line in text.splitlines() if "world_size: 4" not in line) + "\n"
    records = run_suite(tmp_path_factory, text)
    rows = pipeline_bubble_rows(records)
    assert len(rows) == len(records) == 6 and all(r["status"] == "ok" for r in records)
    for row in rows:
        print(f"{row['schedule']} m={row['microbatches']} {row['balance']}: measured {row['measured']:.3f}, "
              f"(p−1)/m {row['theory']:.3f} (×{row['ratio_theory']:.2f}), measured stage times "
              f"{row['stage_theory']:.3f} (×{row['ratio_stage_theory']:.2f}), busiest/mean {row['busy_max_over_mean']:.2f}")
    for row in rows:
        assert 0.9 <= row["ratio_stage_theory"] <= 1.1, row
        assert row["within_stage_theory"]
