"""DeepSpeed pipeline parallelism (PipelineModule + PipelineEngine, 1F1B) through
the whole harness on CPU ranks: fp32 losses equal the single-process reference,
the stage split, p2p traffic and model state are what the 1F1B schedule implies,
DeepSpeed's comms logger agrees with the harness meter on the same step, and the
schedules and ZeRO stages DeepSpeed cannot pipeline are unsupported with reasons.
Under `framework_config: theory` (equal blocks per stage, partition_method
"uniform"); DeepSpeed's default cut is checked in tests/test_framework_config.py."""
from __future__ import annotations

import pytest

from bench import adapters
from bench.adapters.deepspeed.pipeline import ZERO_REASON, why_not_pipeline
from bench.config.knobs import Knobs
from impl.model import build_model, model_config
from tests.conftest import run_suite
from tests.reference import reference_losses

STEPS, WARMUP = 3, 2
B, T, M = 8, 32, 4
SUITE = f"""
name: ds-pipeline
steps: {STEPS}
warmup: {WARMUP}
timeout_s: 300
defaults: {{model: tiny, world_size: 2, pp: 2, microbatches: {M}, batch_size: {B}, seq_len: {T}, precision: fp32,
           adapter: deepspeed, framework_config: theory}}
include:
  - {{world_size: 4, zero: 1, microbatches: 2}}
  - {{precision: bf16}}
  - {{pp_schedule: gpipe}}
  - {{pp_schedule: zbv}}
"""
PP2 = (2, 0, "fp32", "1f1b")
DP2_ZERO1 = (4, 1, "fp32", "1f1b")
BF16 = (2, 0, "bf16", "1f1b")
FP32 = (PP2, DP2_ZERO1)


def key(rec) -> tuple:
    c = rec["config"]
    return (c["world_size"], c["zero"], c["precision"], c["pp_schedule"])


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    recs = {key(r): r for r in run_suite(tmp_path_factory, SUITE)}
    assert len(recs) == 5
    return recs


def _stage_param_counts() -> tuple[int, int]:
    """Parameters of stage 0 (embedding, blocks 0-1) and stage 1 (blocks 2-3, norm, output)."""
    model = build_model(model_config("tiny"), 0)
    n = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    return (n([model.tok_embeddings, *model.layers[:2]]), n([*model.layers[2:], model.norm, model.output]))


def test_cells_ok_and_unsupported_with_reasons(pipe):
    for k in (PP2, DP2_ZERO1, BF16):
        assert pipe[k]["status"] == "ok", (k, pipe[k]["reason"], pipe[k].get("stderr_tail"))
    assert pipe[(2, 0, "fp32", "gpipe")]["status"] == "unsupported"
    assert "runs only its TrainSchedule (1F1B" in pipe[(2, 0, "fp32", "gpipe")]["reason"]
    assert pipe[(2, 0, "fp32", "zbv")]["status"] == "unsupported"
    assert "no zero-bubble schedule" in pipe[(2, 0, "fp32", "zbv")]["reason"]


def test_unsupported_combinations_are_declared():
    def why(**kw):
        return adapters.why_not(Knobs(adapter="deepspeed", world_size=2, pp=2, microbatches=2, **kw))

    assert why() is None
    assert why(pp_schedule="pipedream").startswith("pipeline_pipedream: DeepSpeed's PipelineEngine is synchronous")
    assert why(pp_schedule="interleaved", virtual_stages=2).startswith(
        "pipeline_interleaved: DeepSpeed's PipelineEngine has no interleaved")
    assert "DualPipeV" in why(pp_schedule="dualpipev")
    # ZeRO-2/3 with pp: the knobs already refuse it; the adapter states DeepSpeed's own rule.
    with pytest.raises(ValueError, match="zero = 2 cannot be combined with pp = 2"):
        Knobs(adapter="deepspeed", world_size=2, pp=2, zero=2)
    unchecked = Knobs.model_construct(adapter="deepspeed", world_size=2, dp=1, pp=2, zero=3)
    assert why_not_pipeline(unchecked) == f"pipeline_1f1b with zero = 3: {ZERO_REASON}"


def test_fp32_losses_match_single_process_reference(pipe):
    ref = reference_losses(batch_size=B, seq_len=T, seed=0, steps=WARMUP + STEPS)
    assert ref[-1] < ref[0]
    worst = 0.0
    for k in FP32:
        got = pipe[k]["metrics"]["losses"]
        assert len(got) == WARMUP + STEPS
        for step, (a, b) in enumerate(zip(got, ref)):
            assert abs(a - b) <= 1e-4 * abs(b), f"{k} step {step}: {a} vs reference {b}"
            worst = max(worst, abs(a - b) / abs(b))
    assert worst < 1e-6  # the same math, reordered only by micro-batching: ~1e-7 in practice


def test_bf16_ran_in_bf16(pipe):
    # 16-bit loss checks that need learning: tests/test_precision_learning.py
    fp32, bf16 = pipe[PP2]["metrics"]["losses"], pipe[BF16]["metrics"]["losses"]
    assert bf16 != fp32
    assert pipe[BF16]["notes"]["wrapper"].endswith("(BF16_Optimizer)")


def test_stages_schedule_and_model_state(pipe):
    stage0, stage1 = _stage_param_counts()
    for k in FP32:
        notes = pipe[k]["notes"]
        assert notes["pipeline_stage_rank0"] == {"stage": 0, "parts": [0, 3, 6],
                                                 "layers": ["embedding", "block0", "block1"]}
        assert "TrainSchedule (1F1B)" in notes["pipeline"]
        assert notes["deepspeed_config"]["gradient_accumulation_steps"] == pipe[k]["config"]["microbatches"]
    # fp32 params of the larger stage (max over ranks); ZeRO-1 over dp = 2 halves the
    # optimizer's partition (fp32 master 4 + Adam 8 bytes per parameter), ZeRO-0 keeps Adam's 8.
    state = pipe[PP2]["metrics"]["model_state_bytes"]
    assert state["params"] == 4 * max(stage0, stage1)
    assert 8 * max(stage0, stage1) <= state["optimizer"] <= 8 * max(stage0, stage1) * 1.01
    state = pipe[DP2_ZERO1]["metrics"]["model_state_bytes"]
    assert state["params"] == 4 * max(stage0, stage1)
    assert 6 * max(stage0, stage1) <= state["optimizer"] <= 6 * max(stage0, stage1) * 1.01


def test_p2p_and_gradient_traffic(pipe):
    """Rank 0 is stage 0: per micro-batch it sends one (b, T, D) activation and
    receives its gradient; then it all-reduces its gradients over its dp group."""
    stage0, _ = _stage_param_counts()
    dim = model_config("tiny").dim
    for k in FP32:
        c, comm = pipe[k]["config"], pipe[k]["metrics"]["comm"]
        m, dp = c["microbatches"], c["dp"]
        act_bytes = B // (dp * m) * T * dim * 4
        for kind in ("send", "recv"):
            assert (comm[kind]["calls"], comm[kind]["bytes"]) == (m, m * act_bytes), (k, kind)
        assert comm["broadcast"]["bytes"] == 8  # [dp-group loss, averaged loss] from the last stage
        assert comm["all_reduce"]["group_sizes"] == [dp]
        assert 4 * stage0 <= comm["all_reduce"]["bytes"] <= 4 * stage0 + 16
    # dp = 1: the 1-rank all-reduce moves nothing, so the step's bus bytes are the p2p sends and the loss.
    assert pipe[PP2]["metrics"]["comm_bytes_per_step"] == B * T * dim * 4 + 8
    # ZeRO-1 over dp = 2 all-gathers the updated stage parameters.
    assert pipe[DP2_ZERO1]["metrics"]["comm"]["all_gather"]["bytes"] == 4 * stage0


def test_comms_logger_matches_meter(pipe):
    """Every op the pipeline issues goes through deepspeed.comm, so the logger's calls
    and payload equal the meter's per kind on the metered step (logger msg_size =
    meter bytes, except all-gather: msg_size is the input shard, × dp = the output)."""
    for k in (*FP32, BF16):
        log = pipe[k]["notes"]["deepspeed_comms_logger"]
        comm = pipe[k]["metrics"]["comm"]
        assert set(log["vs_meter"]) == set(comm), k
        for kind, v in log["vs_meter"].items():
            assert v["meter_calls"] == comm[kind]["calls"] and v["meter_bytes"] == comm[kind]["bytes"]
            assert (v["logger_calls"], v["logger_payload_bytes"]) == (v["meter_calls"], v["meter_bytes"]), (k, kind)
        ops = log["ops"]
        assert set(ops) >= {"send", "recv", "broadcast", "all_reduce"}
        assert ops["send"]["msg_sizes"] == {str(B // (pipe[k]["config"]["dp"] * pipe[k]["config"]["microbatches"])
                                                * T * model_config("tiny").dim * (2 if k == BF16 else 4)):
                                            pipe[k]["config"]["microbatches"]}
    gather = pipe[DP2_ZERO1]["notes"]["deepspeed_comms_logger"]["ops"]["all_gather_into_tensor"]
    assert gather["payload_bytes"] == 2 * gather["msg_bytes"]
