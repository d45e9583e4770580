"""DeepSpeed pipeline parallelism (``deepspeed.pipe``) for the `deepspeed` adapter.

The decoder is handed to ``PipelineModule`` as a flat layer list,
``[embedding, block_0 … block_{L−1}, head]`` (head = final norm + output
projection), and ``lm_loss`` is its ``loss_fn``. ``partition_method`` cuts the
list into pp contiguous stages; every rank keeps only its stage's layers, so
stage 0 owns the embedding and the last stage the head, as in the torch
adapter. The model file stays free of pipeline code: the wrappers below only
re-plumb its pieces into DeepSpeed's one-tensor-in, one-tensor-out layer
interface.

``PipelineEngine.train_batch`` runs DeepSpeed's ``TrainSchedule``, which is
1F1B (PipeDream-Flush; Narayanan et al. 2021, §2.2) over
``gradient_accumulation_steps`` = ``microbatches``: with p stages it keeps at
most p micro-batches of activations in flight, and its bubble is
(p−1)/m of the ideal time. Each micro-batch's loss is scaled by 1/m before
backward, so one step equals a full-batch step of the mean loss.

Rank layout: the harness puts pipeline stages on neighbouring ranks
(``ParallelDims.coords``: rank = dp_rank·pp + pp_rank when tp = 1), the
opposite of DeepSpeed's default ``PipeDataParallelTopology`` (axes
pipe, data). The topology below uses axes (data, pipe), so DeepSpeed's data
parallel groups hold exactly the ranks that the harness gives the same
local batch.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from bench.config.knobs import Knobs
from bench.workloads.train import Batch
from impl.model import Decoder, lm_loss
from impl.parallel_dims import ParallelDims

# partition_method: DeepSpeed's default "parameters" balances parameter counts
# (framework_config: default); "uniform", equal layer counts per stage (embedding
# and head count as one layer each), is the theory mode's cut.

SCHEDULE = "1f1b"
UNSUPPORTED_SCHEDULES = {
    "gpipe": "DeepSpeed's PipelineEngine runs only its TrainSchedule (1F1B / PipeDream-Flush); "
             "there is no all-forward-all-backward schedule",
    "interleaved": "DeepSpeed's PipelineEngine has no interleaved (virtual-stage) schedule: one stage per rank",
    "pipedream": "DeepSpeed's PipelineEngine is synchronous (flush every batch); no asynchronous "
                 "PipeDream with weight stashing",
    "zbv": "DeepSpeed's PipelineEngine has no zero-bubble schedule (ZB-V splits backward into B and W; "
           "DeepSpeed's TrainSchedule does not)",
}
ZERO_REASON = ("DeepSpeed's PipelineEngine asserts 'ZeRO-2 and ZeRO-3 are incompatible with pipeline "
               "parallelism': only zero 0/1 with pp > 1")

COMM_NOTE = (
    "Per micro-batch, each stage boundary carries one (b, T, D) activation forward and its gradient back "
    "(p2p send/recv over the pipeline group); after the schedule the stage's gradients are all-reduced over its "
    "data-parallel group (dp = 1: a 1-rank all-reduce, 0 bus bytes), and the last stage broadcasts the loss "
    "(2 floats) to the other stages."
)


def why_not_pipeline(knobs: Knobs) -> str | None:
    """Combinations the DeepSpeed pipeline does not run (None when it runs)."""
    if knobs.pp_schedule in UNSUPPORTED_SCHEDULES:
        return None  # the capability table answers, with the reason
    if knobs.pp_schedule != SCHEDULE:
        return (f"pp_schedule = {knobs.pp_schedule!r}: not wired; DeepSpeed 0.19.8's PipelineEngine runs 1F1B "
                "(DualPipeVModule/DualPipeVEngine exist but are not mapped)")
    if knobs.zero >= 2:
        return f"pipeline_{knobs.pp_schedule} with zero = {knobs.zero}: {ZERO_REASON}"
    if knobs.tp > 1:
        return f"pipeline_{knobs.pp_schedule}: tp = {knobs.tp} with pp is not wired (no DeepSpeed training TP)"
    if knobs.virtual_stages > 1:
        return f"pipeline_{knobs.pp_schedule}: virtual_stages = {knobs.virtual_stages}: " \
               f"{UNSUPPORTED_SCHEDULES['interleaved']}"
    if knobs.offload != "none":
        return f"pipeline_{knobs.pp_schedule}: offload = {knobs.offload} with pp is not wired in this adapter"
    if knobs.checkpointing != "none":
        return f"pipeline_{knobs.pp_schedule}: checkpointing with pp is not wired in this adapter " \
               "(PipelineModule's activation_checkpoint_interval is not mapped)"
    return None


class _Embedding(nn.Module):
    """Stage-0 entry: (B, T) token ids → (B, T, D) hidden states."""

    def __init__(self, model: Decoder) -> None:
        super().__init__()
        self.tok_embeddings = model.tok_embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)


class _PipeBlock(nn.Module):
    """One decoder block on (B, T, D) hidden states; positions 0..T−1 are rotated
    with the decoder's RoPE tables (shared by reference, not parameters)."""

    def __init__(self, model: Decoder, index: int) -> None:
        super().__init__()
        self.block = model.layers[index]
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[1]
        return self.block(h, self.rope_cos[:T], self.rope_sin[:T])


class _Head(nn.Module):
    """Last-stage exit: (B, T, D) hidden states → (B, T, V) logits."""

    def __init__(self, model: Decoder) -> None:
        super().__init__()
        self.norm, self.output = model.norm, model.output

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))


def pipeline_module(model: Decoder, dims: ParallelDims, device: torch.device, partition_method: str):
    """The decoder as a ``deepspeed.pipe.PipelineModule`` holding this rank's stage."""
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import ProcessTopology

    layers = [_Embedding(model), *(_PipeBlock(model, i) for i in range(len(model.layers))), _Head(model)]
    # PipelineModule needs deepspeed.comm before initialize(); this wraps the harness's process group.
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    topology = ProcessTopology(axes=["data", "pipe"], dims=[dims.dp, dims.pp])
    return PipelineModule(layers=layers, topology=topology, loss_fn=lm_loss, partition_method=partition_method)


def pipeline_notes(knobs: Knobs, engine, partition_method: str) -> dict[str, Any]:
    return {
        "pipeline": f"deepspeed.pipe.PipelineEngine TrainSchedule (1F1B), {knobs.pp} stages, {knobs.microbatches} "
                    f"micro-batches, partition_method {partition_method!r}",
        "pipeline_stage_rank0": stage_layers(engine.module),
        "comm_vs_theory": COMM_NOTE,
    }


def stage_layers(module) -> dict[str, Any]:
    """Which layers this rank's stage holds (DeepSpeed's partition boundaries)."""
    names = ["embedding", *(f"block{i}" for i in range(len(module._layer_specs) - 2)), "head"]
    return {"stage": module.stage_id, "parts": [int(p) for p in module.parts],
            "layers": names[module._local_start:module._local_stop]}


def micro_batches(batch: Batch, microbatches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The local batch as the (inputs, labels) pairs ``train_batch`` pulls, one per
    micro-batch: stage 0 reads the inputs, the last stage the labels."""
    return iter([(mb.inputs, mb.targets) for mb in batch.split(microbatches)])


def pipeline_step_fn(engine, microbatches: int, state, window):
    """One optimizer step through the 1F1B schedule.

    ``state.capture_grads`` runs just before the engine's update (after the
    gradient reduction at the end of the schedule), keeping the gradients the
    step needed for the model-state meter."""
    take_step = engine._take_model_step

    def take_step_capturing(*args, **kwargs):
        state.capture_grads()
        return take_step(*args, **kwargs)

    engine._take_model_step = take_step_capturing

    def step(batch: Batch) -> torch.Tensor:
        state.release_grads()
        with window:
            # The mean of the m micro-batch losses of this data-parallel group,
            # averaged over dp and broadcast from the last stage to every stage.
            loss = engine.train_batch(data_iter=micro_batches(batch, microbatches))
        return loss.detach().float().cpu()

    return step
