"""PyTorch's pipeline parallelism (``torch.distributed.pipelining``) for the torch adapter.

The decoder's blocks are cut into S = pp·v contiguous stages (v stages per
rank: 1 for GPipe/1F1B, ``virtual_stages`` for interleaved 1F1B, 2 for ZBV);
stage 0 also owns ``tok_embeddings``, stage S−1 ``norm`` + ``output``. Each
rank builds manual ``PipelineStage``s of its own pieces, so the model file
stays free of pipeline code.

Stage placement: loop layout for interleaved (rank r holds stages r, r+pp, …;
Narayanan et al. 2021, §2.2), V layout for ZBV (rank r holds stages r and
2pp−1−r, so rank 0 holds the first and the last; Qi et al. 2024).

The schedules scale gradients by 1/microbatches (``scale_grads=True``), so
one step equals a full-batch step of the mean loss: pipeline cells train
exactly like the single-process reference.
"""
from __future__ import annotations

import torch
from torch import nn

from bench.adapters.base import TrainStep
from bench.config.knobs import Knobs
from bench.workloads.train import Batch, torch_optimizer
from impl.model import Decoder, lm_loss
from impl.parallel_dims import ParallelDims

SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved": "ScheduleInterleaved1F1B",
    "zbv": "ScheduleZBVZeroBubble",
}


def why_not_pipeline(knobs: Knobs) -> str | None:
    """Combinations the torch pipeline plan does not wire (None when it runs)."""
    if knobs.pp_schedule not in SCHEDULES:
        return None  # the capability table answers (pipedream, unknown schedules)
    if knobs.dp > 1 or knobs.tp > 1:
        return (f"pipeline_{knobs.pp_schedule}: the torch adapter runs pipelines on their own "
                f"(pp = world_size); dp = {knobs.dp}, tp = {knobs.tp} with pp is not wired")
    if knobs.zero:
        return f"pipeline_{knobs.pp_schedule}: zero = {knobs.zero} with pp is not wired in the torch adapter"
    if knobs.precision != "fp32":
        return f"pipeline_{knobs.pp_schedule}: precision = {knobs.precision} with pp is not wired (autocast per stage)"
    if knobs.pp_schedule in ("gpipe", "1f1b") and knobs.virtual_stages > 1:
        return f"pipeline_{knobs.pp_schedule}: virtual_stages > 1 needs pp_schedule 'interleaved' or 'zbv'"
    if knobs.pp_schedule == "zbv" and knobs.virtual_stages not in (1, 2):
        return "pipeline_zbv: ZBV places exactly 2 stages per rank (V layout); virtual_stages must be 1 or 2"
    return None


class PipelineStageModule(nn.Module):
    """One stage's share of the decoder: (B, T) tokens or (B, T, D) hidden
    states in, (B, T, D) hidden states or (B, T, V) logits out."""

    def __init__(self, model: Decoder, layer_ids: range, *, first: bool, last: bool) -> None:
        super().__init__()
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleList(model.layers[i] for i in layer_ids)
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        # RoPE tables are shared by reference: every stage rotates positions 0..T-1.
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        T = h.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h)) if self.output is not None else h


def stage_layer_ids(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous blocks per stage, the remainder going to the earliest stages."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (s < extra)
        out.append(range(start, start + size))
        start += size
    return out


def stages_of_rank(pp_rank: int, pp: int, schedule: str, virtual_stages: int) -> list[int]:
    if schedule == "interleaved":
        return [pp_rank + v * pp for v in range(virtual_stages)]
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank]


def build_pipeline(knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device, notes: dict) -> TrainStep:
    """Stages for this rank, the schedule over them, and the train step."""
    import torch.distributed as dist
    from torch.distributed import pipelining

    rank = dist.get_rank()
    _, pp_rank, _ = dims.coords(rank)
    mine = stages_of_rank(pp_rank, dims.pp, knobs.pp_schedule, knobs.virtual_stages)
    n_stages = dims.pp * (2 if knobs.pp_schedule == "zbv" else len(mine))
    layer_ids = stage_layer_ids(len(model.layers), n_stages)
    modules = [PipelineStageModule(model, layer_ids[s], first=s == 0, last=s == n_stages - 1) for s in mine]
    # pp = world_size (see why_not_pipeline), so the default group is the pipeline group.
    stages = [pipelining.PipelineStage(m, s, n_stages, device) for m, s in zip(modules, mine)]
    cls = getattr(pipelining, SCHEDULES[knobs.pp_schedule])
    multi = knobs.pp_schedule in ("interleaved", "zbv")
    schedule = cls(stages if multi else stages[0], knobs.microbatches, loss_fn=lm_loss)
    optimizer = torch_optimizer(knobs.optimizer, [p for m in modules for p in m.parameters()])
    first, last = 0 in mine, n_stages - 1 in mine
    notes["pipeline"] = (f"torch.distributed.pipelining {cls.__name__}, {n_stages} stages "
                         f"(rank {rank}: stages {mine}, blocks {[list(layer_ids[s]) for s in mine]}), "
                         f"{knobs.microbatches} micro-batches")

    def step(batch: Batch) -> torch.Tensor | None:
        optimizer.zero_grad()
        losses: list[torch.Tensor] = []
        args = (batch.inputs,) if first else ()
        schedule.step(*args, target=batch.targets if last else None, losses=losses if last else None)
        optimizer.step()
        if not last:
            return None
        return torch.stack([l.detach().float() for l in losses]).mean().cpu()

    return TrainStep(step, modules=modules, optimizers=[optimizer], notes=notes)

