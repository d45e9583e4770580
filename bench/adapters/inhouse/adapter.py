"""The `inhouse` adapter: TrainBench's own implementations from `impl/`.

Composition order lives in ``build`` (the plan function); the comments say why.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from bench.adapters.base import Adapter, Capabilities, TrainStep, runs_everywhere
from bench.adapters.step import accumulating_step
from bench.adapters.inhouse.optimizers import ELEMENTWISE, NOTES, extra_state, make_optimizer
from bench.config.framework_config import describe, inhouse_settings, value
from bench.config.knobs import Knobs
from impl.allreduce import ALGORITHMS, validate_algorithm
from impl.checkpointing import apply_activation_checkpointing
from impl.data_parallel import apply_data_parallel
from impl.fusion import apply_fusion, compile_blocks, validate_fusion
from impl.mixed_precision import DynamicLossScaler, MasterWeightOptimizer
from impl.model import Decoder, lm_loss
from impl.parallel_dims import ParallelDims
from impl.zero import apply_zero


class InhouseAdapter(Adapter):
    name = "inhouse"
    description = "TrainBench's reference implementations (impl/)"
    capabilities = Capabilities(
        runs=runs_everywhere(
            "data_parallel", "grad_accumulation", "zero1", "zero2", "zero3", "offload_optimizer",
            "allreduce_ring", "allreduce_tree", "allreduce_ps", "allreduce_ps_sharded", "precision_bf16",
            "precision_fp16", "checkpointing_full", "checkpointing_selective", "checkpointing_every_k",
            *(f"optimizer_{o}" for o in NOTES), "fusion_fused", "fusion_compile", "device_cuda",
            "tensor_parallel_1d", "tensor_parallel_2d", "tensor_parallel_2.5d", "tensor_parallel_3d",
            "sequence_parallel_megatron", "sequence_parallel_ring",
            "pipeline_gpipe", "pipeline_1f1b", "pipeline_interleaved", "pipeline_pipedream", "strategy_auto",
            *(f"attention_{a}" for a in ("sliding_window", "dilated", "global", "random", "block_local",
                                         "longformer", "bigbird")),
        ),
    )

    def why_not(self, knobs: Knobs) -> str | None:
        if knobs.sequence_parallel == "ring":
            from bench.adapters.inhouse.context_parallel import why_not_ring

            why = why_not_ring(knobs)
            if why:
                return why
        if knobs.pp > 1:
            from bench.adapters.inhouse.pipeline import why_not_pipeline

            why = why_not_pipeline(knobs)
            if why:
                return why
        if knobs.tp > 1 and knobs.sequence_parallel != "ring":
            from bench.adapters.inhouse.tp import why_not_tensor_parallel

            why = why_not_tensor_parallel(knobs)
            if why:
                return why
        if knobs.offload == "optimizer+params":
            return "offload_params: parameter offload (ZeRO-Infinity style) is not implemented in impl/zero.py"
        if knobs.allreduce != "backend" and knobs.zero:
            return f"allreduce_{knobs.allreduce}: ZeRO uses reduce-scatter/all-gather, not all-reduce; use zero = 0"
        if knobs.zero and knobs.optimizer not in ELEMENTWISE:
            return (f"optimizer_{knobs.optimizer}: ZeRO steps flat shards that cut across tensors; "
                    f"{knobs.optimizer} needs whole tensors (factored moments, per-layer norms or its own "
                    f"all-reduce); ZeRO runs {', '.join(ELEMENTWISE)}")
        if knobs.optimizer.startswith("onebit") and knobs.allreduce != "backend":
            return f"allreduce_{knobs.allreduce}: 1-bit optimizers communicate through their compressed all-reduce"
        if knobs.fusion == "fused" and knobs.zero:
            return "fusion_fused: the packed SwiGLU weights would be re-pointed into ZeRO's flat buffers; use zero = 0"
        return super().why_not(knobs)

    def build(self, knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
        sparse = None
        if knobs.attention != "dense":
            # First of all: the sparse core (impl/sparse_attention.py, block-gather
            # engine) replaces attention.core before any plan wraps or shards
            # the blocks (selective checkpointing wraps the core it finds; TP
            # hands the core its local heads).
            from bench.workloads.attention import sparse_notes

            sparse = sparse_notes(knobs, model)
        step = self._build(knobs, model, dims, device)
        step.notes.setdefault("framework_config", describe(knobs, inhouse_settings(knobs)))
        if sparse:
            step.notes["attention"] = sparse
        return step

    def _build(self, knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
        if knobs.sequence_parallel == "ring":
            # Ring self-attention: the tp ranks split the sequence (weights
            # replicated, K/V passed around the ring); its own plan and step.
            from bench.adapters.inhouse.context_parallel import build_ring

            return build_ring(knobs, model, dims, device)
        if dims.tp > 1 and knobs.pp == 1:
            # Tensor (+ sequence) parallel has its own plan: it shards the weights
            # before data parallel sees them, and its loss is vocab-parallel.
            from bench.adapters.inhouse.tp import build_tensor_parallel

            return build_tensor_parallel(knobs, model, dims, device)
        if knobs.pp > 1:
            # A pipeline cuts the model into stages and owns its step (schedule,
            # point-to-point, gradient all-reduce across replicas after the flush);
            # with tp > 1 each stage's blocks are Megatron-sharded first.
            from bench.adapters.inhouse.pipeline import build_pipeline

            return build_pipeline(knobs, model, dims, device)
        settings = inhouse_settings(knobs)
        notes: dict = {"model_type": "impl.model.Decoder", "optimizer_impl": NOTES[knobs.optimizer],
                       "framework_config": describe(knobs, settings)}
        # Plan order (torchtitan's): op fusion (it replaces block forwards) →
        # activation checkpointing (wraps those forwards) → compile → mixed
        # precision → data parallel or ZeRO, last, since it must see the final
        # parameters.
        if knobs.fusion == "fused":
            notes["fusion"] = _fuse(model, device)
        if knobs.checkpointing != "none":
            wrapped = apply_activation_checkpointing(model, knobs.checkpointing, every=knobs.checkpoint_every)
            notes["checkpointing"] = (f"{knobs.checkpointing}: {wrapped} of {len(model.layers)} blocks "
                                      + ("recompute whole blocks" if knobs.checkpointing == "full"
                                         else "recompute the attention core"))
        loss = lm_loss
        if knobs.fusion == "compile":
            notes["fusion"] = {"compiled_blocks": compile_blocks(model), "backend": "inductor",
                               "compiled_loss": True}
            # The loss compiled too: inductor fuses the fp32 upcast into the cross-entropy's
            # reductions instead of materialising an fp32 copy of the (B, T, V) logits.
            loss = torch.compile(lm_loss)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(knobs.precision)
        if knobs.zero:
            # Mixed precision: 16-bit parameters and gradients, fp32 master shards.
            param_dtype = dtype or torch.float32
            model.to(param_dtype)
            scaler = DynamicLossScaler() if knobs.precision == "fp16" else None
            zero = apply_zero(model, stage=knobs.zero, group=dist.group.WORLD, param_dtype=param_dtype,
                              offload_optimizer=knobs.offload == "optimizer", scaler=scaler,
                              prefetch=value(settings, "zero.prefetch"))
            optimizer = zero.make_optimizer(lambda shards: make_optimizer(knobs.optimizer, _unnamed(shards)))
            step = accumulating_step(model, zero, microbatches=knobs.microbatches, no_sync=zero.no_sync, loss=loss,
                                     scale_loss=zero.scale)
            notes["zero_units"] = len(zero.units)
            return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes, state=zero.state_tensors,
                             skipped_steps=(lambda: zero.skipped_steps) if scaler else None)

        names = [n for n, _ in model.named_parameters()]
        onebit = knobs.optimizer.startswith("onebit")
        group = dist.group.WORLD if dims.dp > 1 else None

        def inner(params):
            return make_optimizer(knobs.optimizer, zip(names, params), group=group, freeze_step=knobs.freeze_step,
                                  fused=knobs.fusion != "none")

        if dtype is not None:
            # fp32 masters are taken before the cast; 16-bit parameters mean 16-bit
            # gradient traffic. fp16 adds dynamic loss scaling (DeepSpeed's rules);
            # a 1-bit optimizer's ranks must agree on skipped steps, hence the group.
            optimizer = MasterWeightOptimizer.from_fp32_model(model, dtype, inner, group=group if onebit else None)
            notes["precision"] = f"{dtype} parameters and gradients, fp32 masters" + (
                ", dynamic loss scaling from 2^16" if dtype == torch.float16 else "")
        else:
            optimizer = inner(list(model.parameters()))
        sync = None
        if dims.dp > 1 and onebit:
            notes["data_parallel"] = "none: the 1-bit optimizer all-reduces gradients (warm-up) or momentum (compressed)"
        elif dims.dp > 1:
            kwargs = {"bucket_cap_bytes": int(value(settings, "ddp.bucket_cap_mb") * 2**20)}
            if knobs.allreduce != "backend":
                validate_algorithm(knobs.allreduce)  # checked against the backend before it is timed
                kwargs["all_reduce"] = ALGORITHMS[knobs.allreduce]
                notes["allreduce"] = f"impl.allreduce.{knobs.allreduce} (synchronous in the hook: no overlap)"
            sync = apply_data_parallel(model, group=dist.group.WORLD, **kwargs)
        step = accumulating_step(
            model, optimizer, microbatches=knobs.microbatches, no_sync=sync.no_sync if sync else nullcontext, loss=loss,
            scale_loss=getattr(optimizer, "scale", None),
        )
        return TrainStep(step, modules=[model], optimizers=[getattr(optimizer, "inner", optimizer)], notes=notes,
                         state=lambda: _state(model, optimizer),
                         skipped_steps=(lambda: optimizer.skipped_steps) if knobs.precision == "fp16" else None)


def _unnamed(params):
    return ((f"shard{i}", p) for i, p in enumerate(params))


def _fuse(model: Decoder, device: torch.device) -> dict:
    """Fused forwards, checked against an unfused twin before anything is timed."""
    import copy

    reference = copy.deepcopy(model)
    notes = apply_fusion(model, "fused")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0)).to(device)
    notes["validated_max_rel_error"] = validate_fusion(model, reference, tokens)
    notes.pop("optimizer_kwargs", None)
    return notes


def _state(model: Decoder, optimizer) -> dict:
    from bench.meters.memory import default_state_tensors

    if hasattr(optimizer, "state_tensors"):  # master weights: 16-bit params/grads, masters in "optimizer"
        state = optimizer.state_tensors()
    else:
        state = default_state_tensors([model], [optimizer])
    state["optimizer"] = list(state["optimizer"]) + extra_state(optimizer)
    return state
