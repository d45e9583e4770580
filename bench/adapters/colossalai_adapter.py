"""The `colossalai` adapter: Colossal-AI 0.5.0's Booster around the same decoder.

On CPU only TorchDDPPlugin runs unmodified (DESIGN.md); LowLevelZero, Gemini
and HybridParallel assert a CUDA device, so those cells are recorded as
unsupported on CPU with the blocking call quoted, and run on GPUs. No
monkeypatches are applied. Colossal-AI is imported inside ``build`` only
(``colossalai.booster.plugin`` costs ~5 s per rank).
"""
from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from typing import Any

import torch

from bench.adapters.base import ALL_DEVICES, Adapter, Capabilities, TrainStep
from bench.adapters.common import accumulating_step
from bench.knobs import Knobs
from bench.workload import BETAS, EPS, LR, WEIGHT_DECAY, torch_optimizer
from impl.model import Decoder
from impl.parallel_dims import ParallelDims

CUDA_ONLY = frozenset({"cuda"})
# The blocking calls, as raised on this CPU machine (colossalai 0.5.0, torch 2.13):
_LOW_LEVEL_ZERO = ("LowLevelZeroPlugin: 'AssertionError: device is required' from "
                   "assert get_accelerator().name in ['cuda', 'npu'] (zero/low_level/low_level_optim.py:254)")
_GEMINI = ("GeminiPlugin: 'AssertionError: precision fp32 is not supported' (gemini_plugin.py:486), and with bf16 "
           "'RuntimeError: this method is not supported for cpu accelerator' (accelerator/cpu_accelerator.py:242)")
_HYBRID = ("HybridParallelPlugin calls torch.cuda.set_device / current_device in shardformer and "
           "needs a transformers model or a custom policy (not mapped yet)")


class ColossalAIAdapter(Adapter):
    name = "colossalai"
    description = "Colossal-AI 0.5.0 Booster: TorchDDPPlugin (CPU and CUDA); LowLevelZero/Gemini on CUDA"
    capabilities = Capabilities(
        runs={
            **{t: ALL_DEVICES for t in (
                "data_parallel", "grad_accumulation", "optimizer_adamw", "optimizer_sgd", "optimizer_lamb",
                "optimizer_lars", "device_cuda",
            )},
            "zero1": CUDA_ONLY,
            "zero2": CUDA_ONLY,
            "zero3": CUDA_ONLY,
            "offload_optimizer": CUDA_ONLY,
            "precision_bf16": CUDA_ONLY,
            "precision_fp16": CUDA_ONLY,
        },
        reasons={
            "zero1": _LOW_LEVEL_ZERO,
            "zero2": _LOW_LEVEL_ZERO,
            "zero3": _GEMINI,
            "offload_optimizer": _LOW_LEVEL_ZERO,
            "offload_params": "Gemini places parameters itself (placement_policy); not mapped",
            "precision_bf16": "Booster mixed precision goes through LowLevelZero/Gemini or torch.cuda.amp",
            "precision_fp16": "Booster mixed precision goes through LowLevelZero/Gemini or torch.cuda.amp",
            "tensor_parallel_1d": _HYBRID,
            "tensor_parallel_2d": "Colossal-AI 0.5.0 removed the legacy 2D/2.5D/3D tensor-parallel layers",
            "tensor_parallel_2.5d": "Colossal-AI 0.5.0 removed the legacy 2D/2.5D/3D tensor-parallel layers",
            "tensor_parallel_3d": "Colossal-AI 0.5.0 removed the legacy 2D/2.5D/3D tensor-parallel layers",
            **{f"pipeline_{s}": _HYBRID for s in ("gpipe", "1f1b", "interleaved", "pipedream", "zbv")},
            "sequence_parallel_megatron": _HYBRID,
            "sequence_parallel_ring": _HYBRID,
        },
    )

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("colossalai") is None:
            return "colossalai is not installed (pip install --no-deps colossalai==0.5.0; see README)"
        return None

    def build(self, knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
        from colossalai.booster import Booster
        from colossalai.booster.plugin import TorchDDPPlugin

        notes: dict[str, Any] = {"model_type": "impl.model.Decoder", "patched": False}
        optimizer = _optimizer(knobs, model)
        if dims.dp > 1:
            # Same DDP settings as the torch adapter (the RoPE buffers are identical on every rank).
            plugin = TorchDDPPlugin(broadcast_buffers=False)
            booster = Booster(plugin=plugin)
            model_w, optimizer_w, *_ = booster.boost(model, optimizer)
            notes["plugin"] = "TorchDDPPlugin(broadcast_buffers=False)"
            forward, no_sync = model_w, lambda: booster.no_sync(model_w, optimizer_w)
            stepper = optimizer_w  # OptimizerWrapper: zero_grad()/step() as torch's
        else:
            forward, no_sync, stepper = model, nullcontext, optimizer
        step = accumulating_step(forward, stepper, microbatches=knobs.microbatches, no_sync=no_sync)
        notes["optimizer_class"] = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes)


def _optimizer(knobs: Knobs, model: Decoder) -> torch.optim.Optimizer:
    if knobs.optimizer == "lamb":
        from colossalai.nn.optimizer import Lamb

        return Lamb(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if knobs.optimizer == "lars":
        from colossalai.nn.optimizer import Lars

        return Lars(model.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    return torch_optimizer(knobs.optimizer, model.parameters())
