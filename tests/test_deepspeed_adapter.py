"""DeepSpeed (0.19.8) through the whole harness on 2 CPU ranks: fp32 losses equal
the single-process reference for ZeRO 0-3, offload, accumulation and
checkpointing; communication and model-state bytes equal what DeepSpeed
really does, which the test pins against the ZeRO formulas (and the record
explains where DeepSpeed sends or keeps more). The cells run under
`framework_config: theory` (ZeRO-3 gathers every parameter twice); DeepSpeed's
defaults are checked in tests/test_framework_config.py."""
from __future__ import annotations

import pytest

from impl.model import build_model, model_config, total_params
from tests.conftest import bench, records
from tests.reference import reference_losses


STEPS, WARMUP = 3, 2
SUITE = f"""
name: ds-adapter
steps: {STEPS}
warmup: {WARMUP}
timeout_s: 300
defaults: {{model: tiny, world_size: 2, batch_size: 8, seq_len: 32, precision: fp32, adapter: deepspeed,
           framework_config: theory}}
matrix:
  zero: [0, 1, 2, 3]
include:
  - {{zero: 2, offload: optimizer}}
  - {{zero: 3, offload: optimizer+params}}
  - {{zero: 2, precision: bf16}}
  - {{zero: 3, microbatches: 2, checkpointing: full}}
  - {{zero: 1, precision: fp16}}
  - {{zero: 0, tp: 2}}
  - {{zero: 3, framework_config: default}}
"""
PSI = total_params(model_config("tiny"))
N = 2


def _layer_fraction() -> float:
    model = build_model(model_config("tiny"), 0)
    return sum(p.numel() for p in model.layers.parameters()) / PSI


def key(rec) -> tuple:
    c = rec["config"]
    k = (c["zero"], c["offload"], c["precision"], c["microbatches"], c["checkpointing"], c["tp"])
    return k + ("default",) if c["framework_config"] == "default" else k


FP32 = {z: (z, "none", "fp32", 1, "none", 1) for z in range(4)}
OFFLOAD2 = (2, "optimizer", "fp32", 1, "none", 1)
OFFLOAD3 = (3, "optimizer+params", "fp32", 1, "none", 1)
BF16 = (2, "none", "bf16", 1, "none", 1)
ACC_CKPT3 = (3, "none", "fp32", 2, "full", 1)
FP16 = (1, "none", "fp16", 1, "none", 1)
TP2 = (0, "none", "fp32", 1, "none", 2)
RAN = [*FP32.values(), OFFLOAD2, OFFLOAD3, BF16, ACC_CKPT3]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    (tmp / "suite.yaml").write_text(SUITE)
    # A cold TORCH_EXTENSIONS_DIR JIT-builds DeepSpeed's shm comm and cpu_adam ops (~1 min) once.
    bench("run", str(tmp / "suite.yaml"), "--results", str(tmp / "results"), "--no-progress", timeout=1200)
    recs = {key(r): r for r in records(tmp / "results", "ds-adapter")}
    assert len(recs) == 11
    return recs


def test_cells_ok_and_unsupported_with_reasons(ds):
    for k in RAN:
        assert ds[k]["status"] == "ok", (k, ds[k]["reason"], ds[k].get("stderr_tail"))
    assert ds[FP16]["status"] == "unsupported"
    assert "Type fp16 is not supported on your device" in ds[FP16]["reason"]
    assert ds[TP2]["status"] == "unsupported"
    assert ds[TP2]["reason"].startswith("tensor_parallel_1d: no DeepSpeed training TP")


def test_fp32_losses_match_single_process_reference(ds):
    ref = reference_losses(batch_size=8, seq_len=32, seed=0, steps=WARMUP + STEPS)
    assert ref[-1] < ref[0]
    for k in RAN:
        if k[2] != "fp32":
            continue
        got = ds[k]["metrics"]["losses"]
        assert len(got) == WARMUP + STEPS
        for step, (a, b) in enumerate(zip(got, ref)):
            assert abs(a - b) <= 1e-4 * abs(b), f"{k} step {step}: {a} vs reference {b}"


def test_bf16_ran_in_bf16(ds):
    # 16-bit loss checks that need learning: tests/test_precision_learning.py
    fp32, bf16 = ds[FP32[2]]["metrics"]["losses"], ds[BF16]["metrics"]["losses"]
    assert bf16 != fp32
    assert ds[BF16]["notes"]["deepspeed_config"]["bf16"] == {"enabled": True}


def test_comm_volume_per_kind(ds):
    b = 4 * PSI  # fp32 bytes of all parameters (or gradients)
    comm = {k: ds[k]["metrics"]["comm"] for k in RAN}
    # ZeRO-0: one all-reduce of all gradients.
    assert set(comm[FP32[0]]) == {"all_reduce"}
    assert (comm[FP32[0]]["all_reduce"]["calls"], comm[FP32[0]]["all_reduce"]["bytes"]) == (1, b)
    # ZeRO-1/2: DeepSpeed all-reduces the gradient buckets (not a reduce-scatter), plus
    # a 4-byte gradient-norm all-reduce, then all-gathers the updated parameters.
    for k in (FP32[1], FP32[2], OFFLOAD2):
        assert set(comm[k]) == {"all_reduce", "all_gather"}, k
        assert comm[k]["all_reduce"]["bytes"] == b + 4
        assert comm[k]["all_gather"]["bytes"] == b
    assert comm[BF16]["all_gather"]["bytes"] == 2 * PSI
    # ZeRO-3: parameters gathered for forward and again for backward; gradients reduce-scattered.
    for k in (FP32[3], OFFLOAD3):
        assert comm[k]["all_gather"]["bytes"] == 2 * b
        assert comm[k]["reduce_scatter"]["bytes"] == b
        assert comm[k]["broadcast"]["bytes"] < 4096  # trace check after the first step, not parameters


def test_comm_bytes_vs_theory(ds):
    f = _layer_fraction()
    expected = {
        FP32[0]: 1.0,
        FP32[1]: 1.5,  # all-reduce 2Ψ + all-gather Ψ, vs theory 2Ψ (times (N−1)/N)
        FP32[2]: 1.5,
        OFFLOAD2: 1.5,
        BF16: 1.5,
        FP32[3]: 1.0,
        OFFLOAD3: 1.0,
        ACC_CKPT3: 1 + f / 3,  # recompute gathers the blocks' parameters once more per micro-batch
    }
    for k, ratio in expected.items():
        rec = ds[k]
        measured = rec["metrics"]["comm_bytes_per_step"]
        theory = rec["theory"]["comm_bytes_per_step"]
        assert rec["theory_ratio"]["comm_bytes_per_step"] == pytest.approx(measured / theory)
        assert abs(measured / theory / ratio - 1) < 0.01, (k, measured / theory, ratio)
        # The record says why, and by how much.
        assert rec["notes"]["comm_expected_ratio"] == pytest.approx(ratio, rel=1e-3)
        assert rec["notes"]["comm_vs_theory"]
    assert ds[FP32[3]]["theory"]["comm_bytes_per_step"] == pytest.approx(3 * PSI * (N - 1) / N * 4)


def test_model_state_bytes_per_rank(ds):
    """fp32, N = 2. DeepSpeed keeps an fp32 master copy of its partition even in
    fp32 training (optimizer 8Ψ/N + 4Ψ/N), ZeRO-1 frees its full gradients
    before the step (4Ψ/N left at the boundary), and ZeRO-3 with optimizer
    offload keeps two host gradient partitions."""
    expected = {  # bytes, as multiples of Ψ
        FP32[0]: (4, 4, 8),
        FP32[1]: (4, 4 / N, 12 / N),
        FP32[2]: (4, 4 / N, 12 / N),
        OFFLOAD2: (4, 4 / N, 12 / N),
        FP32[3]: (4 / N, 4 / N, 12 / N),
        ACC_CKPT3: (4 / N, 4 / N, 12 / N),
        OFFLOAD3: (4 / N, 8 / N, 12 / N),
        BF16: (2, 2 / N, 12 / N),
    }
    for k, (params, grads, optim) in expected.items():
        state = ds[k]["metrics"]["model_state_bytes"]
        for name, want in (("params", params), ("grads", grads), ("optimizer", optim)):
            # Alignment padding and Adam's step counters add < 1 %.
            assert want * PSI <= state[name] <= want * PSI * 1.01, (k, name, state[name] / PSI, want)
    # Where DeepSpeed keeps what the ZeRO formula counts, the harness's ratio is ~1.
    for k in (FP32[0], BF16):
        assert abs(ds[k]["theory_ratio"]["model_state_total"] - 1) < 0.05
        assert "model_state_vs_theory" not in ds[k]["notes"]
    # Where it keeps more, the record says what (the report counts these ratios as explained).
    for k in (FP32[1], FP32[2], FP32[3], OFFLOAD3):
        assert "fp32 master clone" in ds[k]["notes"]["model_state_vs_theory"], k
    assert "grads 4Ψ/N instead of 4Ψ" in ds[FP32[1]]["notes"]["model_state_vs_theory"]
    assert "two host fp32 gradient partitions" in ds[OFFLOAD3]["notes"]["model_state_vs_theory"]


def test_zero3_defaults_keep_small_parameters_whole(ds):
    """DeepSpeed's default stage3_param_persistence_threshold (1e5 elements) covers every
    parameter of `tiny`: each stays whole on every rank beside its partition, 4Ψ + 4Ψ/N
    of parameters, and the record names it (smoke's ZeRO-3 cell read 3× theory)."""
    rec = ds[FP32[3] + ("default",)]
    assert rec["status"] == "ok", rec["reason"]
    params = rec["metrics"]["model_state_bytes"]["params"]
    assert 4 * PSI * (1 + 1 / N) <= params <= 4 * PSI * (1 + 1 / N) * 1.01, params / PSI
    assert "100.0% of Ψ·e" in rec["notes"]["model_state_vs_theory"]


def test_measurements_are_complete(ds):
    for k in RAN:
        m = ds[k]["metrics"]
        assert len(m["step_time_s"]) == STEPS and all(t > 0 for t in m["step_time_s"])
        assert m["peak_mem_bytes"] > 0
        notes = ds[k]["notes"]
        assert notes["model_type"] == "impl.model.Decoder"
        assert notes["deepspeed_config"]["zero_optimization"]["stage"] == k[0]
        assert notes["deepspeed_config"]["gradient_accumulation_steps"] == k[3]
    assert ds[OFFLOAD2]["notes"]["optimizer_class"] == "DeepSpeedCPUAdam"
    assert ds[FP32[2]]["notes"]["optimizer_class"] == "AdamW"


def test_comms_logger_beside_meter(ds):
    """DeepSpeed's comms logger on the harness's metered step, ZeRO-1/2/3 on 2 ranks.

    Relation: for each collective kind, the logger's calls equal the meter's and
    its bytes in the meter's payload terms equal the meter's ``bytes`` — msg_size
    is the op's ``tensor`` argument, so all-reduce and reduce-scatter (input)
    match one to one and all-gather's msg_size is the input shard, N × less than
    the meter's output. Bus bytes then follow by the same nccl-tests factors."""
    b = 4 * PSI
    for k in (FP32[1], FP32[2], FP32[3]):
        log, comm = ds[k]["notes"]["deepspeed_comms_logger"], ds[k]["metrics"]["comm"]
        assert log["window"].startswith("the harness's metered step")
        for kind, v in log["vs_meter"].items():
            assert (v["meter_calls"], v["meter_bytes"]) == (comm[kind]["calls"], comm[kind]["bytes"])
            assert (v["logger_calls"], v["logger_payload_bytes"]) == (v["meter_calls"], v["meter_bytes"]), (k, kind)
        ops = log["ops"]
        gather = ops["all_gather_into_tensor"]
        assert gather["payload_bytes"] == N * gather["msg_bytes"] == comm["all_gather"]["bytes"]
        # DeepSpeed's all-reduce "algbw" is 2·size/t, twice nccl-tests' size/t; with
        # N = 2 its busbw (size/t·2(N−1)/N) is nccl-tests' algbw, so exactly half.
        ar = ops["all_reduce"]
        assert ar["algbw_gbps_deepspeed"] == pytest.approx(2 * ar["busbw_gbps_deepspeed"], rel=1e-9)
        # The logger's timer wraps the meter's (which waits for completion), per call.
        assert ar["time_s"] >= comm["all_reduce"]["time_s"]
    for k in (FP32[1], FP32[2]):
        ops = ds[k]["notes"]["deepspeed_comms_logger"]["ops"]
        assert ops["all_reduce"]["msg_bytes"] == b + 4 and ops["all_gather_into_tensor"]["msg_bytes"] == b // N
        # Several gradient buckets: DeepSpeed's latencies are running totals, so its
        # summed "total latency" over-counts the op's real total.
        assert ops["all_reduce"]["calls"] > 2
        assert ops["all_reduce"]["time_s_as_logged"] > 1.5 * ops["all_reduce"]["time_s"]
    ops = ds[FP32[3]]["notes"]["deepspeed_comms_logger"]["ops"]
    assert ops["reduce_scatter_tensor"]["msg_bytes"] == b
    assert ops["all_gather_into_tensor"]["msg_bytes"] == b  # forward + backward gathers, N × Ψ/N shards
