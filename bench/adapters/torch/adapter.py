"""The `torch` adapter: PyTorch's own distributed training.

zero 0 → DistributedDataParallel; zero 1 → DDP + ZeroRedundancyOptimizer;
zero 2 → FSDP2 ``fully_shard(reshard_after_forward=False)`` (parameters stay
gathered between forward and backward, like ZeRO-2); zero 3 → FSDP2 with
``reshard_after_forward=True``. ``offload: optimizer+params`` → FSDP2's
``CPUOffloadPolicy``; bf16 → ``MixedPrecisionPolicy`` under FSDP2, autocast
otherwise; fp16 → autocast + ``GradScaler``; checkpointing → per-block
``torch.utils.checkpoint``; tp > 1 → DTensor tensor (+ sequence) parallelism
(``torch_tp``), on a ("dp", "tp") mesh with FSDP2 when zero ≥ 2; pp > 1 →
``torch.distributed.pipelining`` (``torch_pp``); ``fusion: compile`` →
``torch.compile`` per block.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bench.adapters.base import ALL_DEVICES, Adapter, Capabilities, TrainStep, runs_everywhere
from bench.adapters.step import accumulating_step
from bench.config.framework_config import describe, fsdp2_settings, settings_for, torch_ddp_settings, value
from bench.config.knobs import Knobs
from bench.workloads.train import Batch, optimizer_spec, torch_optimizer
from impl.model import Decoder, lm_loss
from impl.parallel_dims import ParallelDims

_SPARSE = ("sliding_window", "dilated", "global", "random", "block_local", "longformer", "bigbird")


class TorchAdapter(Adapter):
    name = "torch"
    description = "PyTorch native: DDP, ZeroRedundancyOptimizer, FSDP2, autocast, checkpointing"
    capabilities = Capabilities(
        runs={
            **runs_everywhere(
                "data_parallel", "grad_accumulation", "zero1", "zero2", "zero3", "offload_optimizer", "offload_params",
                "precision_bf16", "precision_fp16", "checkpointing_full", "optimizer_adamw", "optimizer_sgd",
                "optimizer_adafactor", "optimizer_adam8bit",
            ),
            **runs_everywhere(
                "tensor_parallel_1d", "sequence_parallel_megatron", "pipeline_gpipe", "pipeline_1f1b",
                "pipeline_interleaved", "pipeline_zbv", "fusion_compile", "strategy_fsdp1",
            ),
            "device_cuda": ALL_DEVICES,
            **{f"attention_{a}": frozenset({"cuda"}) for a in _SPARSE},
        },
        reasons={
            **{f"tensor_parallel_{m}": "torch has only 1D DTensor TP (Colwise/Rowwise); no 2D/2.5D/3D grids"
               for m in ("2d", "2.5d", "3d")},
            "sequence_parallel_ring": "not wired: torch's ring attention is the experimental context_parallel API, "
                                      "which this adapter does not use",
            "pipeline_pipedream": "torch.distributed.pipelining has no asynchronous PipeDream schedule "
                                  "(weight stashing); its schedules all flush each step",
            "allreduce_ring": "PyTorch uses its backend's all-reduce (NCCL/gloo choose the algorithm)",
            "allreduce_tree": "PyTorch uses its backend's all-reduce (NCCL/gloo choose the algorithm)",
            "allreduce_ps": "PyTorch has no parameter-server all-reduce",
            "allreduce_ps_sharded": "PyTorch has no parameter-server all-reduce",
            **{f"attention_{a}": "flex_attention (BlockMask) has no backward on CPU in torch 2.13 "
                                 "('FlexAttention does not support backward on CPU'); compiled on CUDA"
               for a in _SPARSE},
        },
    )

    def why_not(self, knobs: Knobs) -> str | None:
        if knobs.strategy == "fsdp1":
            from bench.adapters.torch.fsdp1 import why_not_fsdp1

            why = why_not_fsdp1(knobs)
            if why:
                return why
            return super().why_not(knobs)
        if knobs.offload == "optimizer":
            return ("offload_optimizer: FSDP2 offloads parameters, gradients and optimizer state together "
                    "(CPUOffloadPolicy); use offload: optimizer+params with zero: 3")
        if knobs.precision == "fp16" and knobs.zero >= 2:
            return "precision_fp16: FSDP2 needs ShardedGradScaler for fp16; not wired yet (bf16 works)"
        if knobs.tp > 1 and knobs.dp > 1 and knobs.zero < 2:
            return ("tensor_parallel_1d with dp > 1 needs zero: 2 or 3 (FSDP2 on a (dp, tp) mesh); DDP or "
                    "ZeroRedundancyOptimizer over DTensor parameters is not wired")
        if knobs.fusion == "compile" and knobs.tp > 1:
            return ("fusion_compile with tp > 1: per-block torch.compile of DTensor-parallel blocks fails in "
                    "backward on torch 2.13 (DTensor Redistribute backward receives a plain Tensor gradient)")
        if knobs.pp > 1:
            from bench.adapters.torch.pipeline import why_not_pipeline

            why = why_not_pipeline(knobs)
            if why:
                return why
        return super().why_not(knobs)

    def build(self, knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
        notes: dict[str, Any] = {"model_type": "impl.model.Decoder"}
        if knobs.attention != "dense":
            # Sparse attention first: compiled flex_attention with a BlockMask of the
            # pattern's layout replaces attention.core before anything wraps the blocks.
            from bench.workloads.attention import sparse_notes

            notes["attention"] = sparse_notes(knobs, model)
        # Plan order (torchtitan's): tensor parallel → activation checkpointing →
        # compile → data parallel wrapper. TP first, so checkpointing and compile
        # see the sharded blocks; FSDP last, so it shards the DTensor weights
        # along the dp mesh dimension. A pipeline splits the model instead.
        if dims.pp > 1:
            from bench.adapters.torch.pipeline import build_pipeline

            _checkpoint_and_compile(model, knobs, notes)
            notes["framework_config"] = describe(knobs, [])
            return build_pipeline(knobs, model, dims, device, notes)
        dp_mesh = None
        if dims.tp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            from bench.adapters.torch.tp import apply_tensor_parallel

            mesh = init_device_mesh(device.type, (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))
            dp_mesh = mesh["dp"]
            sp = knobs.sequence_parallel == "megatron"
            apply_tensor_parallel(model, mesh["tp"], sequence_parallel=sp)
            notes["tensor_parallel"] = f"DTensor parallelize_module, torchtitan Llama plan (tp={dims.tp}" + (
                ", SequenceParallel norms)" if sp else ")")
            notes["comm_vs_theory"] = ("the plan all-gathers the full (B, T, V) logits for the loss; Megatron's "
                                       "vocab-parallel cross-entropy (the theory, and the in-house TP) all-reduces "
                                       "3 values per token instead")
            if dims.dp == 1 or knobs.zero < 2:
                notes["model_state_vs_theory"] = (
                    "DTensor's embedding backward returns the vocab-sharded embedding's gradient as Replicate: every "
                    "rank holds the full V×D gradient (+V·D·(t−1)/t values over the sharded theory)")
        _checkpoint_and_compile(model, knobs, notes)
        forward, no_sync, optimizer, stepper = model, nullcontext, None, None
        if knobs.strategy == "fsdp1":
            from bench.adapters.torch.fsdp1 import wrap_fsdp1

            forward = wrap_fsdp1(model, knobs, dims, device, notes)
            no_sync, model = forward.no_sync, forward
            optimizer = torch_optimizer(knobs.optimizer, forward.parameters())
        elif knobs.zero >= 2:
            forward, no_sync = _apply_fsdp2(model, knobs, dims, device, notes, dp_mesh)
            optimizer = torch_optimizer(knobs.optimizer, model.parameters())
        elif dims.dp > 1:
            # DDP's defaults (25 MB buckets) except broadcast_buffers: the model's
            # only buffers are the RoPE tables, identical on every rank, and
            # re-broadcasting them each forward would add traffic no user wants.
            kwargs = ddp_kwargs(knobs)
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, **kwargs
            )
            forward, no_sync = ddp, ddp.no_sync
            notes["wrapper"] = f"DistributedDataParallel({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        if optimizer is None and knobs.zero == 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            cls, kwargs = optimizer_spec(knobs.optimizer)
            optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
            notes["optimizer_wrapper"] = "ZeroRedundancyOptimizer"
            notes["comm_vs_theory"] = ("ZeroRedundancyOptimizer keeps DDP's full gradient all-reduce (2Ψ(N−1)/N) and then "
                                       "broadcasts each updated shard from its owner (Ψ): more than ZeRO-1's RS+AG 2Ψ(N−1)/N")
        if optimizer is None:
            optimizer = torch_optimizer(knobs.optimizer, model.parameters())
        update = optimizer
        if dims.tp > 1 and knobs.zero < 2:
            from bench.adapters.torch.tp import ReduceGradsThenStep

            update = ReduceGradsThenStep(optimizer)
        if knobs.precision != "fp32" and knobs.zero < 2 and knobs.strategy != "fsdp1":
            dtype = torch.bfloat16 if knobs.precision == "bf16" else torch.float16
            autocast = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731
            notes["precision"] = f"torch.autocast({device.type}, {dtype}), fp32 parameters"
            notes["comm_vs_theory"] = ("autocast keeps fp32 parameters and gradients, so gradient traffic is 4 bytes "
                                       "per parameter: twice the 16-bit mixed-precision theory")
            if knobs.precision == "fp16":
                stepper = _ScaledStep(optimizer, torch.amp.GradScaler(device.type))
                notes["precision"] += ", GradScaler"
            step = _autocast_step(forward, stepper or update, autocast, knobs.microbatches, no_sync)
        else:
            step = accumulating_step(forward, update, microbatches=knobs.microbatches, no_sync=no_sync)
        notes["framework_config"] = describe(knobs, settings_for(knobs))
        scaled = stepper if isinstance(stepper, _ScaledStep) else None
        return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes,
                         state=_zero1_state(model, optimizer) if knobs.zero == 1 else None,
                         skipped_steps=(lambda: scaled.skipped) if scaled else None)


def ddp_kwargs(knobs: Knobs) -> dict[str, Any]:
    """DDP's settings for this cell (its defaults except broadcast_buffers; see framework_config)."""
    settings = torch_ddp_settings(knobs)
    return {name.removeprefix("ddp."): value(settings, name)
            for name in ("ddp.bucket_cap_mb", "ddp.broadcast_buffers", "ddp.gradient_as_bucket_view")}


def _checkpoint_and_compile(model: Decoder, knobs: Knobs, notes: dict) -> None:
    if knobs.checkpointing == "full":
        _checkpoint_blocks(model)
        notes["checkpointing"] = "torch.utils.checkpoint per block (use_reentrant=False)"
    if knobs.fusion == "compile":
        # Per block, as torchtitan does: every block has the same code, so the
        # first compilation is reused and a graph break stays local to a block.
        for block in model.layers:
            block.compile()
        notes["fusion"] = "torch.compile per block (nn.Module.compile, inductor)"


def _checkpoint_blocks(model: Decoder) -> None:
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        inner = block.forward
        block.forward = lambda *args, _f=inner: checkpoint(_f, *args, use_reentrant=False)


def _apply_fsdp2(model: Decoder, knobs: Knobs, dims: ParallelDims, device: torch.device, notes: dict, mesh=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else init_device_mesh(device.type, (dims.dp,))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": knobs.zero == 3}
    if knobs.precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    if knobs.offload == "optimizer+params":
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # The same units as impl/zero.py: embedding, each block, final norm + head;
    # the root then owns no parameters of its own.
    fully_shard(model.tok_embeddings, **kwargs)
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard([model.norm, model.output], **kwargs)
    fully_shard(model, **kwargs)
    if value(fsdp2_settings(knobs), "fsdp2.explicit_prefetch"):
        # FSDP2's explicit prefetching (torchtitan's and the FSDP2 docs' example): each block's
        # forward issues the next block's all-gather, each backward the previous block's.
        blocks = list(model.layers)
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1:i + 2])
            block.set_modules_to_backward_prefetch(blocks[max(i - 1, 0):i])
    notes["wrapper"] = f"FSDP2 fully_shard(reshard_after_forward={knobs.zero == 3})"
    if knobs.zero == 2:
        notes["model_state_vs_theory"] = ("FSDP2 without reshard-after-forward communicates like ZeRO-2 but reshards "
                                          "after backward, so parameters at rest are sharded (Ψ/N), not full as in ZeRO-2")
    if knobs.offload == "optimizer+params":
        notes["model_state_vs_theory"] = ("CPUOffloadPolicy steps the optimizer on the offloaded fp32 parameters: "
                                          "no separate master copy (the theory's +4Ψ/N)")
    if knobs.precision == "bf16":
        notes["precision"] = "MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16), fp32 sharded parameters"

    def no_sync():
        model.set_requires_gradient_sync(False)
        return _Restore(model)

    return model, no_sync


class _Restore:
    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        self.model.set_requires_gradient_sync(True)


class _ScaledStep:
    """Optimizer step through a GradScaler (fp16 dynamic loss scaling)."""

    def __init__(self, optimizer, scaler) -> None:
        self.optimizer, self.scaler = optimizer, scaler
        self.skipped = 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def step(self) -> None:
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # GradScaler skips the update exactly when it found inf/NaN, and then backs the scale off.
        self.skipped += self.scaler.get_scale() < scale


def _autocast_step(forward, optimizer, autocast, microbatches: int, no_sync):
    def step(batch: Batch) -> torch.Tensor:
        optimizer.zero_grad()
        parts = batch.split(microbatches)
        total = torch.zeros(())
        for i, mb in enumerate(parts):
            with no_sync() if i < len(parts) - 1 else nullcontext():
                with autocast():
                    loss = lm_loss(forward(mb.inputs), mb.targets) / len(parts)
                (optimizer.scale(loss) if hasattr(optimizer, "scale") else loss).backward()
            total += loss.detach().float().cpu()
        optimizer.step()
        return total

    return step


def _zero1_state(model: nn.Module, optimizer) -> Any:
    def state() -> dict[str, list[torch.Tensor]]:
        params = list(model.parameters())
        opt_state = [v for per in optimizer.optim.state.values() for v in per.values() if isinstance(v, torch.Tensor)]
        return {"params": params, "grads": [p.grad for p in params if p.grad is not None], "optimizer": opt_state}

    return state
