"""The Megatron train step: Megatron's parallel state, DDP, optimizer and
pipeline schedule around the GPTModel chunks of ``bench.adapters.megatron.model``."""
from __future__ import annotations

from typing import Any

import torch

from bench.adapters.base import TrainStep
from bench.adapters.megatron.config import RANK_ORDER, dtype, optimizer_config, settings
from bench.adapters.megatron.model import build_chunks, copy_weights, transformer_config
from bench.config.framework_config import describe
from bench.config.knobs import Knobs
from bench.workloads.train import Batch
from impl.model import Decoder
from impl.parallel_dims import ParallelDims


def build_step(knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device,
               notes: dict[str, Any]) -> TrainStep:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = transformer_config(knobs, model.cfg, dtype(knobs))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size, order=RANK_ORDER)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)  # dropout is 0: the seed only has to exist
    chunks = build_chunks(config, model.cfg)
    copy_weights(chunks, model, dims.tp, parallel_state.get_tensor_model_parallel_rank())
    chunks = [c.to(device) for c in chunks]
    if config.bf16 or config.fp16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=knobs.zero == 1)
    chunks = [DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(optimizer_config(knobs), chunks, config_overrides={})
    if config.fp16:
        config.grad_scale_func = optimizer.scale_loss
    forward_backward = get_forward_backward_func()
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    def step(batch: Batch) -> torch.Tensor | None:
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        parts = batch.split(knobs.microbatches)
        data = [iter(parts) for _ in chunks] if len(chunks) > 1 else iter(parts)
        out = forward_backward(
            forward_step_func=_forward_step, data_iterator=data, model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(parts), seq_length=batch.inputs.shape[1], micro_batch_size=parts[0].inputs.shape[0],
            forward_only=False)
        ok, _, _ = optimizer.step()
        step.skipped += not ok  # fp16: an overflow skips the update
        return torch.stack([d["lm loss"] for d in out]).mean().cpu() if last else None

    step.skipped = 0
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    padding = {"padded": sum(b.numel - b.numel_unpadded for c in chunks for b in c.buffers),
               "params": sum(b.numel_unpadded for c in chunks for b in c.buffers)}
    notes["megatron"] = {
        "ddp": {k: getattr(ddp_config, k) for k in ("overlap_grad_reduce", "overlap_param_gather",
                                                    "use_distributed_optimizer", "bucket_size",
                                                    "pad_buckets_for_high_nccl_busbw", "average_in_collective")},
        "optimizer": [f"{type(o).__module__}.{type(o).__name__}" for o in opts],
        "rank_order": RANK_ORDER, "model_chunks": len(chunks),
        "recompute": config.recompute_granularity,
        "bucket_padding": padding,
    }
    notes["framework_config"] = describe(knobs, settings(knobs))
    why = _comm_differences(padding, dims, knobs)
    if why:
        notes["comm_vs_theory"] = why

    def state() -> dict[str, list[torch.Tensor]]:
        return {"params": [p for c in chunks for p in c.parameters()],
                "grads": [b.grad_data for c in chunks for b in c.buffers],
                "optimizer": [v for o in opts for s in o.optimizer.state.values()
                              for v in s.values() if isinstance(v, torch.Tensor)]}

    return TrainStep(step, modules=chunks, optimizers=[o.optimizer for o in opts], notes=notes, state=state,
                     skipped_steps=(lambda: step.skipped) if config.fp16 else None)


def _comm_differences(padding: dict[str, int], dims: ParallelDims, knobs: Knobs) -> str:
    """What Megatron sends beyond the papers' volumes, by name and size (``padding``:
    the DDP buffers' padded and parameter elements)."""
    parts = []
    padded, total = padding["padded"], padding["params"]
    if padded and dims.dp > 1:
        parts.append(f"DDP bucket padding (with the distributed optimizer each parameter starts at a multiple of 64 "
                     f"values and each bucket ends at a multiple of lcm(dp, 128)): {padded} elements on {total} "
                     f"(+{padded / total:.3%}) in every gradient reduce-scatter and parameter all-gather")
    if knobs.sequence_parallel == "megatron":
        parts.append("sequence parallel: the backward of each column-parallel linear (qkv, fc1, the output layer) "
                     "all-gathers its sequence-sharded input again instead of keeping the gathered copy "
                     "(Megatron's LinearWithGradAccumulationAndAsyncCommunication), (2L+1) all-gathers of (b, s, h) "
                     "more than the paper's count")
    groups = [g for g, n in (("model-parallel (tp × pp)", dims.tp * dims.pp),
                             ("data-parallel, the distributed optimizer's shards", dims.dp if knobs.zero == 1 else 1))
              if n > 1]
    if groups:
        parts.append(f"the optimizer's gradient-norm all-reduce over the {' and '.join(groups)} group (one fp32 value "
                     f"per step, computed even with clipping off)")
    return "; ".join(parts)


def _forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
    mb = next(data_iterator)
    device = next(model.parameters()).device
    out = model(mb.inputs.to(device), None, None, labels=mb.targets.to(device))
    return out, _loss


def _loss(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's mean token loss (Megatron divides by the micro-batch count)."""
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}  # Megatron divides `loss` in place by the micro-batch count
