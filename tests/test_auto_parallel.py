"""Auto-parallelism (bench/plan, bench/plan/planner.py): the planner's cost model
against measurements on a CPU matrix where every feasible plan of a narrowed
space is run through the real `bench run`, a `strategy: auto` cell resolved
before launch, `bench plan` on a GPU target, and published memory figures.

The machine is 2 shared cores, so timings are noisy: the matrix is chosen so
that its step times span > 2× (ZeRO-3 and TP with 4 micro-batches pay many
latency-bound collectives; a 2-stage pipeline with 1 micro-batch idles half
the time), and the numbers are printed for the report (`-s`).

The measured-matrix tests carry the `calibration` marker: a rank correlation
of step times needs a quiet machine (under another job's load it fell from
0.95 to 0.1 here), so they are deselected from the per-commit run and run
nightly (`pytest -m calibration`, .github/workflows/nightly.yml). Everything
else here (cost-model components, paper figures, `strategy: auto` resolved
and run through the CLI, `bench plan`) runs on every commit."""
from __future__ import annotations

import math

import pytest
import yaml

from bench.plan.fit import predict_device_bytes
from bench.config.knobs import Knobs
from bench.plan.planner import validation
from bench.theory import activation_bytes_per_layer, model_state_bytes
from bench.plan.calibrate import calibrate, fit_alpha_beta
from bench.plan.cost_model import estimate, stage_times, tp_call_extra, zero_in_place
from bench.plan.layer_profile import zero_key
from bench.plan.machine import MachineProfile, default_gpu_profile
from bench.plan.search import search
from impl.model_config import PRESETS, total_params
from tests.conftest import bench, records

BASE = {"world_size": 2, "model": "small", "batch_size": 8, "seq_len": 128}
SPACE = {"microbatches": [1, 4], "zero": [0, 3], "checkpointing": ["none"], "offload": ["none"],
         "sequence_parallel": ["none"]}


def _why_not(knobs):
    from bench import adapters

    return adapters.why_not(knobs)


PASSES = 3
"""Passes over the whole matrix; each cell's step time is the median of its passes' medians."""


def measure_matrix(tmp, base: dict, space: dict, name: str) -> tuple:
    """Calibrate this machine, run every feasible plan of ``space`` around ``base``
    (plus one `strategy: auto` cell) in PASSES whole passes, and report the first."""
    profile = calibrate(tmp / "profile.json")
    plans = search(base, profile, memory_budget_bytes=None, why_not=_why_not, space=space).plans
    suite = {"name": name, "steps": 6, "warmup": 2, "timeout_s": 240, "predict": True,
             "machine_profile": str(tmp / "profile.json"), "defaults": base,
             "include": [p.choice() for p in plans] + [{"strategy": "auto"}]}
    (tmp / "suite.yaml").write_text(yaml.safe_dump(suite))
    runs = [_run(tmp, f"pass{i}", name) for i in range(PASSES)]
    recs = _median_of_passes(runs)
    manual = [r for r in recs if r["config"]["strategy"] == "manual"]
    auto = [r for r in recs if r["config"]["strategy"] == "auto"]
    bench("report", str(tmp / "pass0" / name), "--out", str(tmp / "reports"))
    pages = list((tmp / "reports").rglob("index.html"))
    return profile, plans, manual, auto, pages, tmp


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return measure_matrix(tmp_path_factory.mktemp("auto"), BASE, SPACE, "auto-parallel")


def _run(tmp, results: str, name: str) -> list[dict]:
    bench("run", str(tmp / "suite.yaml"), "--results", str(tmp / results), "--no-progress", timeout=900)
    return records(tmp / results, name)


def _median_of_passes(runs: list[list[dict]]) -> list[dict]:
    """The first pass's records, each with its step time replaced by the median of
    that cell's medians over the passes. The matrix runs whole, pass after pass,
    so a slow spell of this 2-core VM (10–40 % for seconds to minutes) lands on
    different cells in different passes instead of on one cell three times."""
    import copy
    import statistics

    out = []
    for rec in runs[0]:
        rec = copy.deepcopy(rec)
        if rec["status"] == "ok":
            times = [r["metrics"]["step_time_median_s"] for run in runs for r in run
                     if r["cell_id"] == rec["cell_id"] and r["status"] == "ok"]
            rec["metrics"]["step_time_median_s"] = statistics.median(times)
            rec["metrics"]["step_time_pass_medians_s"] = times
        out.append(rec)
    return out


@pytest.mark.calibration
def test_every_feasible_plan_was_measured_with_its_prediction(measured) -> None:
    _, plans, manual, _, _, _ = measured
    assert len(plans) == 8  # dp2 × zero {0,3} × m {1,4}; tp2 × m {1,4}; pp2 × m {1,4} (inhouse: no ZeRO with tp/pp)
    assert {p.label() for p in plans} == {r["notes"]["plan"]["label"] for r in manual}
    for r in manual:
        assert r["status"] == "ok", r["reason"]
        assert r["notes"]["plan"]["profile"].startswith("measured on")


@pytest.mark.calibration
def test_predicted_step_time_ranks_the_plans(measured) -> None:
    _, _, manual, _, _, _ = measured
    v = print_validation(manual)
    assert v["spread"] > 1.8  # the matrix spans enough for a rank correlation to mean something
    assert v["spearman"] >= 0.8
    assert v["top1_gap_pct"] <= 10


def print_validation(manual: list[dict]) -> dict:
    """The planner's validation of these records (bench.plan.planner.validation) with
    the measured spread, printed cell by cell for the README (`-s`)."""
    v = validation(manual)
    for r in manual:
        passes = r["metrics"]["step_time_pass_medians_s"]
        print(f"{r['notes']['plan']['label']:<28} passes " + " ".join(f"{t * 1e3:6.1f}" for t in passes) + " ms")
    for row in sorted(v["rows"], key=lambda r: r["measured_ms"]):
        print(f"{row['plan']:<28} measured {row['measured_ms']:7.1f} ms predicted {row['predicted_ms']:7.1f} ms "
              f"(×{row['time_ratio']:.2f}); peak {row['measured_mem_mib']:6.1f} MiB predicted "
              f"{row['predicted_mem_mib']:6.1f} (×{row['mem_ratio']:.3f})")
    times = [r["measured_ms"] for r in v["rows"]]
    spread = max(times) / min(times)
    print(f"Spearman {v['spearman']:.3f}; measured spread {spread:.2f}×; top-1 {v['top1']} is "
          f"{v['top1_gap_pct']:.1f} % behind the measured best {v['best']}")
    print(f"memory: median error {v['mem_median_error_pct']:.1f} %, max {v['mem_max_error_pct']:.1f} %")
    return {**v, "spread": spread}


@pytest.mark.calibration
def test_predicted_peak_memory(measured) -> None:
    """Within 10 % for every cell. TP with 4 micro-batches used to read 67-73 MiB
    against 63.3 predicted: the tracker missed the frees gloo's worker thread
    makes (bench.meters.memory); it now reads 63.8. ZeRO-3 with accumulation
    is modelled by walking its backward (memory_model.zero_backward_peak)."""
    _, _, manual, _, _, _ = measured
    v = validation(manual)
    print(f"memory: median error {v['mem_median_error_pct']:.1f} %, max {v['mem_max_error_pct']:.1f} %")
    for row in v["rows"]:
        assert abs(row["mem_ratio"] - 1) <= 0.10, row


@pytest.mark.calibration
def test_strategy_auto_runs_the_planners_best_plan(measured) -> None:
    _, _, _, auto, _, tmp = measured
    (rec,) = auto
    assert rec["status"] == "ok", rec["reason"]
    plan = rec["notes"]["plan"]
    profile = MachineProfile.load(tmp / "profile.json")  # with the layer profile the suite measured into it
    best = search({**BASE, "strategy": "auto"}, profile, memory_budget_bytes=None, why_not=_why_not).plans[0]
    assert plan["choice"] == best.choice() and plan["considered"] > plan["feasible"] > 8
    assert {k: rec["config"][k] for k in plan["choice"]} == plan["choice"]  # the cell ran the chosen knobs
    assert "strategy_auto" in rec["techniques"]


@pytest.mark.calibration
def test_report_shows_the_planner_validation(measured) -> None:
    *_, pages, _ = measured
    (page,) = pages
    html = page.read_text()
    assert 'id="planner-table"' in html and "Spearman" in html and html.count("dp2 tp1 pp1") >= 4


def test_strategy_auto_cell_runs_the_best_plan_of_its_profile(tmp_path) -> None:
    """Per commit: one `strategy: auto` cell (tiny, 2 ranks) through `bench run`
    with a fixed profile; the record ran the search's top plan and carries it."""
    _toy_profile().save(tmp_path / "p.json")
    base = {**BASE, "model": "tiny", "seq_len": 32}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "auto-one", "steps": 2, "warmup": 1, "machine_profile": str(tmp_path / "p.json"),
        "defaults": {**base, "strategy": "auto"}}))
    bench("run", str(tmp_path / "s.yaml"), "--results", str(tmp_path / "r"), "--no-progress")
    (rec,) = records(tmp_path / "r", "auto-one")
    assert rec["status"] == "ok", rec["reason"]
    plan = rec["notes"]["plan"]
    # the planner measured the feasible plans' layer shapes into the profile first
    profile = MachineProfile.load(tmp_path / "p.json")
    assert profile.layer("tiny", 32, 2, 1, 4) is not None
    tp_entry = profile.layer("tiny", 32, 2, 2, 8)  # with the in-place cost of one TP all-reduce
    assert tp_entry["tp_call_s"] > 0 and "tp_call_s" not in profile.layer("tiny", 32, 2, 1, 4)
    tp_plan = Knobs(**{**base, "tp": 2, "adapter": "inhouse"})
    assert tp_call_extra(tp_plan, PRESETS["tiny"], profile) == pytest.approx(max(0.0, tp_entry["tp_call_s"] - profile.alpha_beta(
        "all_reduce", 2).time_s(8 * 32 * PRESETS["tiny"].dim * 4, 1)))
    assert profile.optimizer_rate("adamw", "tiny", 2, "flat") > 0
    # ZeRO-2/3 plans got impl.zero's in-place cost, and their estimate reads it
    assert profile.layer("tiny", 32, 2, 1, 4)[zero_key(3)] > 0 and profile.layer("tiny", 32, 2, 1, 1)[zero_key(2)] > 0
    z3 = Knobs(**{**base, "zero": 3, "adapter": "inhouse"})
    assert zero_in_place(z3, PRESETS["tiny"], profile) > 0
    assert "zero 3: in-place probe" in estimate(z3, profile).notes
    best = search({**base, "strategy": "auto"}, profile, memory_budget_bytes=None, why_not=_why_not).plans[0]
    assert best.estimate.notes == ["compute: layer profile"]
    assert plan["choice"] == best.choice() and plan["considered"] >= plan["feasible"] > 1
    assert {k: rec["config"][k] for k in plan["choice"]} == plan["choice"]
    assert "strategy_auto" in rec["techniques"]


def test_shipped_suite_is_the_validated_matrix() -> None:
    """suites/auto_parallel.yaml measures exactly the feasible plans of the space
    the calibration test validates, each with its prediction, and one auto cell."""
    from pathlib import Path

    from bench.config.suite import load_suite

    _, cells = load_suite(Path(__file__).parent.parent / "suites" / "auto_parallel.yaml")
    manual = [c for c in cells if c.knobs.strategy == "manual"]
    plans = search(BASE, _toy_profile(), memory_budget_bytes=None, why_not=_why_not, space=SPACE).plans
    assert sorted(p.label() for p in plans) == sorted(c.plan["label"] for c in manual)
    assert all(c.plan["predicted"]["step_time_s"] > 0 for c in cells)
    (auto,) = [c for c in cells if c.knobs.strategy == "auto"]
    assert auto.plan["considered"] > auto.plan["feasible"] > len(manual)


def test_no_feasible_plan_is_an_error_naming_the_field(tmp_path) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "auto-oom", "device_memory_gib": 0.001, "machine_profile": str(tmp_path / "p.json"),
        "defaults": {**BASE, "strategy": "auto"}}))
    _toy_profile().save(tmp_path / "p.json")
    out = bench("validate", str(tmp_path / "s.yaml"), check=False)
    flat = " ".join(out.stderr.split())
    assert out.returncode == 2 and "strategy = 'auto': none of" in flat and "over the memory budget" in flat


def _toy_profile() -> MachineProfile:
    grid = {f"{n}:{r}:{w}": 1e10 for n in (1, 2) for r in (64, 4096) for w in (64, 1024)}
    comm = {f"{k}:2": {"alpha_s": 1e-4, "beta_bytes_per_s": 1e9} for k in ("all_reduce", "all_gather",
                                                                          "reduce_scatter", "p2p")}
    return MachineProfile(host="toy", device="cpu", source="toy", cores=2, matmul_flops=grid, comm=comm,
                          mem_bandwidth_bytes_per_s=1e10, op_overhead_s=1e-6)


def test_alpha_beta_fit_recovers_a_line() -> None:
    pts = [(x, 2e-4 + x / 3e9) for x in (4e3, 2.6e5, 4.2e6)]
    fit = fit_alpha_beta(pts)
    assert fit["alpha_s"] == pytest.approx(2e-4, rel=1e-6) and fit["beta_bytes_per_s"] == pytest.approx(3e9, rel=1e-6)


def test_cost_model_components_follow_the_theory() -> None:
    p = _toy_profile()
    k = lambda **kw: Knobs(**{**BASE, **kw})  # noqa: E731
    dp, pp1, pp4 = estimate(k(), p), estimate(k(pp=2), p), estimate(k(pp=2, microbatches=4), p)
    # a pipeline takes Σ t_r + (m − 1)·max t_r over its ranks' stage times: with one
    # micro-batch, compute + bubble is the whole model's time for that micro-batch
    cfg = PRESETS["small"]
    whole, _, _ = stage_times(k(world_size=1, batch_size=8), cfg, p)
    assert pp1.compute_s + pp1.bubble_s == pytest.approx(whole[0])
    per_rank, _, _ = stage_times(k(pp=2, microbatches=4), cfg, p)
    assert pp4.compute_s == pytest.approx(4 * max(per_rank))
    assert pp4.bubble_s == pytest.approx(sum(per_rank) - max(per_rank))
    # stages are cut by parameters (impl.pipeline.partition_layers): the head's
    # compute exceeds its parameter share, so the last stage is the busiest
    assert per_rank[1] > per_rank[0]
    # full recompute adds one forward: between 1/4 and 1/3 more matmul time
    ck = estimate(k(checkpointing="full"), p)
    assert 1.2 < ck.compute_s / dp.compute_s <= 4 / 3 + 1e-9
    # ZeRO-3 moves 3Ψ(N−1)/N against DDP's 2Ψ(N−1)/N bus bytes (fp32)
    psi = total_params(PRESETS["small"])
    assert dp.comm_bus_bytes == pytest.approx(2 * psi * 4 / 2)
    assert estimate(k(zero=3), p).comm_bus_bytes == pytest.approx(3 * psi * 4 / 2)
    # memory: model state is bench.plan.fit's, checkpointing keeps only block inputs
    assert dp.state_bytes == predict_device_bytes(k()).state_bytes
    assert ck.activation_bytes < dp.activation_bytes / 10


def test_zero_in_place_scales_the_probe_by_traffic() -> None:
    """The probe times a one-block decoder (3 ZeRO units); the model's cost is the
    probe × m × the ratio of their α–β traffic per micro-batch. With α = 0 the
    ratio is the parameter ratio; a stage the probe lacks falls back to α–β and overlap."""
    from impl.model_config import total_params

    p = _toy_profile()
    for key in p.comm:
        p.comm[key]["alpha_s"] = 0.0
    cfg = PRESETS["small"]
    one_block = total_params(cfg) - (cfg.n_layers - 1) * (total_params(cfg) - 2 * cfg.vocab_size * cfg.dim - cfg.dim) / cfg.n_layers
    p.layers["small:128:2:1:1"] = {"block_fwd_s": 1e-3, "block_bwd_s": 2e-3, "core_fwd_s": 1e-4, "embed_s": 1e-4,
                                    "head_s": 1e-3, zero_key(3): 0.010}
    k = Knobs(**{**BASE, "zero": 3, "microbatches": 4})
    assert zero_in_place(k, cfg, p) == pytest.approx(4 * 0.010 * total_params(cfg) / one_block)
    est = estimate(k, p)
    assert est.exposed_comm_s == pytest.approx(zero_in_place(k, cfg, p))
    assert zero_in_place(Knobs(**{**BASE, "zero": 2, "microbatches": 4}), cfg, p) is None  # not probed
    assert zero_in_place(Knobs(**{**BASE, "microbatches": 4}), cfg, p) is None  # DDP: α–β and overlap


def test_zero_backward_walk_mirrors_impl_zero() -> None:
    """The walk uses impl.zero's in-flight bound; under accumulation the ZeRO-3
    peak is in the backward (gradient shards of earlier micro-batches + the
    reduce-scatter working set), with one micro-batch at the loss."""
    from bench.plan.memory_model import ZERO_RS_IN_FLIGHT, memory, zero_unit_numels
    from impl.zero import MAX_INFLIGHT_RS

    cfg = PRESETS["small"]
    assert ZERO_RS_IN_FLIGHT == MAX_INFLIGHT_RS
    assert sum(zero_unit_numels(cfg)) == pytest.approx(total_params(cfg))
    state, act, loss, work = memory(Knobs(**BASE, zero=3, microbatches=4), cfg)
    psi = total_params(cfg)
    assert loss == 0 and state == pytest.approx(16 * psi / 2)  # 4Ψ/N params + grads, 8Ψ/N Adam (fp32)
    assert work > 2 * psi / 2  # more than the gradient shards it adds to
    _, _, loss1, work1 = memory(Knobs(**BASE, zero=3), cfg)
    assert loss1 > 0 and work1 == 0


def test_zero_paper_model_state_figures() -> None:
    """Rajbhandari et al. 2020, Fig. 1: Ψ = 7.5B, Adam in mixed precision (K = 12),
    N_d = 64: 120 GB baseline, 31.4 GB P_os, 16.6 GB P_os+g, 1.88 GB P_os+g+p."""
    psi, gb = 7.5e9, 1e9
    figures = {0: (1, 120), 1: (64, 31.4), 2: (64, 16.6), 3: (64, 1.88)}
    for stage, (nd, paper) in figures.items():
        got = sum(model_state_bytes(psi, zero=stage, dp=nd, precision="fp16").values()) / gb
        assert got == pytest.approx(paper, abs=0.05), (stage, got, paper)
    # the planner's memory uses the same formulas: llama-7b ZeRO-3 over 64 ranks = 16Ψ/64
    knobs = Knobs(model="llama-7b", world_size=64, zero=3, precision="bf16", batch_size=64, seq_len=2048,
                  device="cuda")
    psi7 = total_params(PRESETS["llama-7b"])
    assert predict_device_bytes(knobs).state_bytes == pytest.approx(16 * psi7 / 64)
    # at its peak (the loss of the only micro-batch) the 2Ψ/N gradient shard is not made yet
    est = estimate(knobs, default_gpu_profile("H100 SXM"))
    assert est.state_bytes == pytest.approx(14 * psi7 / 64)


def test_korthikanti_activation_reduction() -> None:
    """Korthikanti et al. 2022, GPT-3 175B (a = 96, h = 12288, s = 2048, t = 8):
    per layer sbh(10 + 24/t + 5as/(ht)) with TP; sequence parallel + selective
    recompute keeps 34·sbh/t — about 5× less (§5, Table 2)."""
    kw = dict(s=2048, b=1, h=12288, a=96)
    tp_only = activation_bytes_per_layer(tp=8, **kw)
    sp_sel = activation_bytes_per_layer(tp=8, sequence_parallel=True, recompute="selective", **kw)
    assert tp_only == pytest.approx(2048 * 12288 * (10 + 3 + 80 / 8))
    assert sp_sel == pytest.approx(2048 * 12288 * 34 / 8)
    assert 5 < tp_only / sp_sel < 5.5


def test_bench_plan_gpu_target_and_emitted_suite(tmp_path) -> None:
    out = bench("plan", "--model", "llama-7b", "--gpus", "64", "--gpu-mem-gib", "80", "--top", "5",
                "--emit-suite", str(tmp_path / "plan.yaml"))
    flat = " ".join(out.stdout.split())
    assert "default, not measured: H100 SXM" in flat and "over the memory budget" in flat
    suite = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert suite["predict"] is True and len(suite["include"]) == 5
    assert suite["defaults"]["world_size"] == 64 and suite["defaults"]["model"] == "llama-7b"
    profile = default_gpu_profile("H100 SXM")
    plans = search({"model": "llama-7b", "world_size": 64, "batch_size": 256, "seq_len": 2048, "device": "cuda",
                    "precision": "bf16"}, profile, memory_budget_bytes=80 * 2**30).plans
    assert all(p.estimate.memory_bytes <= 80 * 2**30 for p in plans)
    assert [p.estimate.step_time_s for p in plans] == sorted(p.estimate.step_time_s for p in plans)
    assert not math.isnan(plans[0].estimate.step_time_s)
