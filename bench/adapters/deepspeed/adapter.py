"""The `deepspeed` adapter: DeepSpeed's engine (ZeRO 0-3, ZeRO-Offload, bf16,
activation checkpointing, gradient accumulation) around ``impl.model.Decoder``,
and its PipelineEngine for pp > 1 (``deepspeed_pipeline``). DeepSpeed's comms
logger runs beside the harness's meter on the metered step (``deepspeed_comms``).

DeepSpeed is imported inside ``build`` only, so listing and validating cells
never import it. The harness's process group is reused (DeepSpeed wraps it in
its ``TorchBackend``; ``dist_init_required=False``).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from bench.adapters.base import ALL_DEVICES, Adapter, Capabilities, TrainStep, Unsupported
from bench.adapters.deepspeed.comms import CONFIG as COMMS_LOGGER
from bench.adapters.deepspeed.pipeline import UNSUPPORTED_SCHEDULES, why_not_pipeline
from bench.config.framework_config import Setting, deepspeed_settings, describe, value
from bench.config.knobs import Knobs
from bench.workloads.train import BETAS, EPS, learning_rate, SGD_MOMENTUM, WEIGHT_DECAY, Batch
from impl.model import Decoder, lm_loss, total_params
from impl.parallel_dims import ParallelDims

CUDA_ONLY = frozenset({"cuda"})
# JIT-built ops (shm comm ~24 s, cpu_adam ~41 s) are cached across cells and runs,
# per environment: two venvs sharing one cache rebuild each other's ops. Anything
# that launches DeepSpeed ranks itself (bench/plan/autotune_compare.py) must use it too:
# a build killed in the default cache leaves a lock every later rank waits on.
TORCH_EXTENSIONS_DIR = Path(sys.prefix) / "trainbench-torch-extensions"
_NO_TP = "no DeepSpeed training TP for a plain nn.Module (AutoTP targets Hugging Face models)"


class DeepSpeedAdapter(Adapter):
    name = "deepspeed"
    description = "DeepSpeed engine: ZeRO 0-3, ZeRO-Offload (DeepSpeedCPUAdam), bf16/fp16, activation checkpointing"
    capabilities = Capabilities(
        runs={
            **{t: ALL_DEVICES for t in (
                "data_parallel", "grad_accumulation", "zero1", "zero2", "zero3", "offload_optimizer",
                "offload_params", "checkpointing_full", "precision_bf16", "optimizer_adamw", "optimizer_sgd",
                "fusion_fused", "device_cuda", "pipeline_1f1b",
            )},
            "precision_fp16": CUDA_ONLY,
        },
        reasons={
            "precision_fp16": "DeepSpeed 0.19.8 on CPU: 'Type fp16 is not supported on your device' "
                              "(needs AVX512-fp16)",
            "tensor_parallel_1d": _NO_TP,
            "tensor_parallel_2d": "DeepSpeed has no 2D (SUMMA) tensor parallelism",
            "tensor_parallel_2.5d": "DeepSpeed has no 2.5D tensor parallelism",
            "tensor_parallel_3d": "DeepSpeed has no 3D tensor parallelism",
            "sequence_parallel_megatron": "needs tensor parallelism (not mapped)",
            "sequence_parallel_ring": "DeepSpeed's sequence parallelism is Ulysses (all-to-all), not ring attention",
            **{f"pipeline_{s}": why for s, why in UNSUPPORTED_SCHEDULES.items()},
            "checkpointing_selective": "DeepSpeed checkpoints whole functions; no selective recompute",
            "optimizer_adafactor": "not a DeepSpeed optimizer type",
            "optimizer_adam8bit": "not a DeepSpeed optimizer type",
            "optimizer_onebit_adam": "OneBitAdam is no longer an accepted optimizer type in DeepSpeed 0.19.8",
            "optimizer_onebit_lamb": "OneBitLamb is no longer an accepted optimizer type in DeepSpeed 0.19.8",
            "optimizer_lamb": "DeepSpeed's FusedLamb has no CPU op in 0.19.8 (CUDA not mapped yet)",
            "optimizer_lars": "not a DeepSpeed optimizer type",
            "fusion_compile": "DeepSpeed's engine.compile() is not wired into this adapter",
            **{f"allreduce_{a}": "DeepSpeed uses the backend's collectives; no algorithm choice"
               for a in ("ring", "tree", "ps")},
            **{f"attention_{a}": "deepspeed.ops.sparse_attention is removed in DeepSpeed 0.19.8"
               for a in ("sliding_window", "dilated", "global", "random", "block_local", "longformer", "bigbird")},
            "strategy_auto": "DeepSpeed autotuning is a launcher-driven search, not mapped",
        },
    )

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("deepspeed") is None:
            return "deepspeed is not installed (pip install deepspeed==0.19.8)"
        return None

    def why_not(self, knobs: Knobs) -> str | None:
        return (why_not_pipeline(knobs) if knobs.pp > 1 else None) or super().why_not(knobs)

    def build(self, knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
        if dims.tp > 1:
            raise Unsupported(f"tp = {dims.tp}: {_NO_TP}")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
        import deepspeed

        from bench.adapters.deepspeed import comms as deepspeed_comms, pipeline as deepspeed_pipeline

        psi, largest = total_params(model.cfg), max(p.numel() for p in model.parameters())
        settings = framework_settings(knobs, psi, largest)
        config = deepspeed_config(knobs, psi, largest, settings)
        # Measured before ZeRO-3 partitions the parameters (numel() is 0 after).
        recomputed = _layer_fraction(model) if knobs.checkpointing == "full" else 0.0
        persistent = (_persistent_fraction(model, value(settings, "zero_optimization.stage3_param_persistence_threshold"))
                      if knobs.zero == 3 else 0.0)
        if knobs.checkpointing == "full":
            _checkpoint_layers(model)
        partition = value(settings, "pipeline.partition_method") if dims.pp > 1 else None
        module = deepspeed_pipeline.pipeline_module(model, dims, device, partition) if dims.pp > 1 else model
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=config,
            dist_init_required=False,
        )
        state = _ModelState(engine, knobs.zero)
        notes: dict[str, Any] = {
            "model_type": "impl.model.Decoder" + (" pieces in deepspeed.pipe.PipelineModule" if dims.pp > 1 else ""),
            "wrapper": f"deepspeed.DeepSpeedEngine ({type(engine.optimizer).__name__})",
            "optimizer_class": type(_inner_optimizer(engine)).__name__,
            "deepspeed_config": config,
            "framework_config": describe(knobs, settings),
            "checkpointing": "deepspeed.checkpointing.checkpoint around each Block.forward"
            if knobs.checkpointing == "full" else None,
            "model_state_accounting": (
                "params: the rank's module parameters (ZeRO-3: its param.ds_tensor partitions); grads: the "
                "gradient storage live at the accumulation boundary (after the last backward, before the update); "
                "optimizer: optimizer state plus DeepSpeed's fp32 master copy (ZeRO-1/2/3 keep a partition clone "
                "even in fp32 training, +4Ψ/N). ZeRO-1 holds full-size gradients (4Ψ) at the end of backward, "
                "then reduces and frees them, so at the boundary only its partition (4Ψ/N) remains."
            ),
        }
        notes.update(deepspeed_pipeline.pipeline_notes(knobs, engine, partition) if dims.pp > 1
                     else deepspeed_comms.comm_vs_theory(knobs, recomputed_fraction=recomputed,
                                                         persistent_fraction=persistent))
        why = model_state_differences(knobs, persistent)
        if why:
            notes["model_state_vs_theory"] = why
        window = deepspeed_comms.CommsLoggerWindow(dims.dp)
        notes[deepspeed_comms.NOTES_KEY] = window.summary  # filled in place on the metered step
        fn = (deepspeed_pipeline.pipeline_step_fn(engine, knobs.microbatches, state, window) if dims.pp > 1
              else _step_fn(engine, knobs.microbatches, state, window))
        return TrainStep(fn, modules=[engine.module], optimizers=[_inner_optimizer(engine)], notes=notes,
                         state=state.tensors,
                         skipped_steps=(lambda: engine.skipped_steps) if knobs.precision == "fp16" else None)


def deepspeed_config(knobs: Knobs, psi: int, largest_param_numel: int = 0,
                     settings: list[Setting] | None = None) -> dict[str, Any]:
    """The knobs as a DeepSpeed config dict (https://www.deepspeed.ai/docs/config-json/); the
    ZeRO settings per `framework_config` (``bench.config.framework_config.deepspeed_settings``,
    or the cell's ``settings`` when the caller already has them)."""
    micro = knobs.batch_size // (knobs.dp * knobs.microbatches)
    zero: dict[str, Any] = {"stage": knobs.zero}
    for s in settings if settings is not None else deepspeed_settings(knobs, psi, largest_param_numel):
        if s.name.startswith("zero_optimization.") and s.value is not None:
            zero[s.name.removeprefix("zero_optimization.")] = s.value
    if knobs.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": knobs.device == "cuda"}
    if knobs.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": knobs.device == "cuda"}
    config: dict[str, Any] = {
        "train_batch_size": knobs.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": knobs.microbatches,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "optimizer": _optimizer_config(knobs),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "comms_logger": dict(COMMS_LOGGER),
    }
    if knobs.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif knobs.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if knobs.optimizer == "sgd":
        config["zero_allow_untested_optimizer"] = True
    return config


def framework_settings(knobs: Knobs, psi: int, largest_param_numel: int) -> list[Setting]:
    """Every DeepSpeed setting of this cell, the config's and the cell-driven ones, for the record."""
    settings = deepspeed_settings(knobs, psi, largest_param_numel)
    if knobs.offload == "none" and knobs.fusion != "fused" and knobs.optimizer == "adamw":
        settings.append(Setting("optimizer.params.torch_adam", True, False,
                                "fusion: none asks for the unfused torch.optim.AdamW (DeepSpeed's default is "
                                "FusedAdam, the cell's fusion: fused)"))
    if knobs.pp > 1:
        settings.append(Setting("pipeline.topology", "ProcessTopology(axes=['data', 'pipe'])",
                                "PipeDataParallelTopology (axes pipe, data)",
                                "the harness puts a replica's pipeline stages on neighbouring ranks; DeepSpeed's "
                                "data-parallel groups must hold the ranks that get the same local batch"))
    if knobs.optimizer == "sgd":
        settings.append(Setting("zero_allow_untested_optimizer", True, False,
                                "SGD is not a DeepSpeed optimizer type; the engine takes torch.optim.SGD only with it"))
    return settings


def _optimizer_config(knobs: Knobs) -> dict[str, Any]:
    if knobs.optimizer == "sgd":
        # Not a DeepSpeed type: the engine falls back to getattr(torch.optim, "SGD").
        return {"type": "SGD", "params": {"lr": learning_rate(), "momentum": SGD_MOMENTUM}}
    params: dict[str, Any] = {"lr": learning_rate(), "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY}
    # With offload DeepSpeed picks DeepSpeedCPUAdam(adamw_mode=True); otherwise
    # its default is FusedAdam (multi-tensor kernel) = our `fusion: fused`, and
    # `torch_adam` gives torch.optim.AdamW, the unfused baseline.
    if knobs.offload == "none" and knobs.fusion != "fused":
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def _checkpoint_layers(model: Decoder) -> None:
    """Full activation checkpointing: each Block keeps only its input and
    recomputes its forward in backward (Chen et al. 2016), via DeepSpeed's
    reentrant ``deepspeed.checkpointing.checkpoint``. The instance attribute
    keeps ``Module.__call__`` (and ZeRO-3's fetch hooks) around it."""
    from deepspeed.runtime.activation_checkpointing.checkpointing import checkpoint  # = deepspeed.checkpointing

    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward)


def _inner_optimizer(engine) -> Any:
    """The torch optimizer that holds the state (ZeRO wrappers keep it at .optimizer)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


class _ModelState:
    """This rank's DeepSpeed model states, per category, for the harness's
    model-state meter (``TrainStep(state=...)``).

    DeepSpeed frees gradients inside ``engine.step()``, so after a step none
    are left to count. ``capture_grads`` keeps the gradient storage live at the
    accumulation boundary (after the last backward, before the update) until
    the next step begins, as torch's ``zero_grad(set_to_none=True)`` at step
    start would: that is the gradient memory the step needs."""

    def __init__(self, engine, stage: int) -> None:
        self.engine, self.stage = engine, stage
        self._grads: list[torch.Tensor] = []

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        opt = self.engine.optimizer
        # ZeRO-3 holds each parameter's partition (ds_tensor); a persistent one (at or under
        # stage3_param_persistence_threshold) is also kept whole, gathered after every update.
        params = [t for p in self.engine.module.parameters()
                  for t in ((p.ds_tensor, *((p,) if getattr(p, "ds_persist", False) else ()))
                            if self.stage == 3 and hasattr(p, "ds_tensor") else (p,))]
        # fp32 master copies: ZeRO-1/2 keep a partition clone even in fp32
        # training, and so does ZeRO-3 (its share-if-fp32 shortcut compares a
        # torch.device with a device-name string, never equal); the 16-bit
        # stage-0 wrapper (FP16_UnfusedOptimizer) keeps per-parameter fp32 copies.
        masters = _tensors_in(getattr(opt, name, None) for name in (
            "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
            "fp32_groups"))
        states = [v for per_param in _inner_optimizer(self.engine).state.values() if isinstance(per_param, dict)
                  for v in per_param.values() if isinstance(v, torch.Tensor)]
        return {"params": params, "grads": list(self._grads), "optimizer": masters + states}

    def release_grads(self) -> None:
        self._grads = []

    def capture_grads(self) -> None:
        opt = self.engine.optimizer
        grads = [p.grad for p in self.engine.module.parameters()]
        if self.stage in (1, 2):
            # The rank's reduced partition (views into one flat buffer), or with
            # offload the host fp32 partition's .grad.
            for g in (getattr(opt, "averaged_gradients", None) or {}).values():
                grads += g if isinstance(g, list) else [g]
            grads += [t.grad for t in getattr(opt, "single_partition_of_fp32_groups", [])]
        if self.stage == 3:
            grads.append(getattr(opt, "grad_partitions_flat_buffer", None))
            grads += [t.grad for t in getattr(opt, "fp32_partitioned_groups_flat", [])]
        grads += list(getattr(opt, "fp32_groups_gradients_flat", None) or [])  # BF16_Optimizer
        self._grads = [g for g in grads if isinstance(g, torch.Tensor)]


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in nested lists/tuples/generators (DeepSpeed keeps groups as lists, or lists of lists)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if obj is None or isinstance(obj, (str, bytes, dict)):
        return []
    try:
        return [t for item in obj for t in _tensors_in(item)]
    except TypeError:
        return []


def _step_fn(engine, microbatches: int, state: _ModelState, window):
    def step(batch: Batch) -> torch.Tensor:
        state.release_grads()
        parts = batch.split(microbatches)
        total = torch.zeros(())
        with window:
            for i, mb in enumerate(parts):
                # Unscaled per-micro-batch loss: engine.backward divides by
                # gradient_accumulation_steps, and engine.step() updates only on
                # the accumulation boundary (the last micro-batch).
                loss = lm_loss(engine(mb.inputs), mb.targets)
                engine.backward(loss)
                if i == len(parts) - 1:
                    state.capture_grads()
                engine.step()
                total += loss.detach().float().cpu() / len(parts)
        return total

    return step


def model_state_differences(knobs: Knobs, persistent: float) -> str:
    """What DeepSpeed keeps beyond (or below) the ZeRO formula of ``bench.theory``
    (Ψ parameters, N ranks, e bytes per 16-bit or fp32 value), as the report's
    explanation of a model-state ratio away from 1."""
    parts = []
    if knobs.zero >= 1 and knobs.precision == "fp32":
        parts.append("an fp32 master clone of the optimizer partition even in fp32 training: optimizer +4Ψ/N")
    if knobs.zero == 1:
        parts.append("ZeRO-1 frees its full gradients before the step, so at the accumulation boundary only the "
                     "reduced partition is live: grads 4Ψ/N instead of 4Ψ")
    if knobs.zero == 3 and persistent > 0:
        parts.append(f"parameters at or under stage3_param_persistence_threshold stay whole on every rank next to "
                     f"their partitions: params + {persistent:.1%} of Ψ·e (all of them on a model this small)")
    if knobs.offload != "none" and knobs.zero == 2 and knobs.precision != "fp32":
        parts.append("with optimizer offload the host gradient partition CPUAdam reads is fp32: grads 4Ψ/N "
                     "instead of 2Ψ/N")
    if knobs.offload != "none" and knobs.zero == 3:
        parts.append("ZeRO-3 offload keeps two host fp32 gradient partitions: grads 8Ψ/N")
    return "; ".join(parts)


def _persistent_fraction(model: Decoder, threshold: int) -> float:
    """Share of Ψ that ZeRO-3 keeps whole on every rank (parameters at or under the persistence threshold)."""
    sizes = [p.numel() for p in model.parameters()]
    return sum(n for n in sizes if n <= threshold) / sum(sizes)


def _layer_fraction(model: Decoder) -> float:
    """Share of Ψ in the checkpointed blocks (their parameters are used again by recompute)."""
    in_layers = sum(p.numel() for p in model.layers.parameters())
    return in_layers / sum(p.numel() for p in model.parameters())
