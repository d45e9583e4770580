"""Colossal-AI's ZeRO on CUDA: LowLevelZeroPlugin for zero 1/2 (precision,
optimizer offload) and GeminiPlugin for zero 3 (chunk-based, fp16/bf16, with
HybridAdam), as Colossal-AI's own examples set them up. Both assert a CUDA
accelerator, so on CPU these cells are unsupported before launch (the adapter's
capability table quotes the assertion).

Unverified on a GPU in this repository's CI (no GPU there); tests/test_colossalai_zero.py
checks, on CUDA, that the built booster holds the plugin the cell names."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bench.adapters.base import TrainStep
from bench.config.knobs import Knobs
from bench.workloads.train import BETAS, EPS, learning_rate, WEIGHT_DECAY, Batch
from impl.model import Decoder, lm_loss

GEMINI_PRECISIONS = ("fp16", "bf16")  # colossalai/booster/plugin/gemini_plugin.py SUPPORTED_PRECISION


def why_not_zero(knobs: Knobs) -> str | None:
    """What the LowLevelZero/Gemini mapping cannot run on CUDA (None when it runs)."""
    if knobs.zero == 0 and knobs.precision != "fp32":
        return (f"precision_{knobs.precision} with zero 0: Colossal-AI 0.5.0's Booster mixed precision for a plain "
                "model is BF16MixedPrecision (an empty class) or torch-amp fp16, not mapped here; mixed precision "
                "runs through LowLevelZero (zero 1/2) or Gemini (zero 3)")
    if knobs.zero == 3 and knobs.precision not in GEMINI_PRECISIONS:
        return "zero3: GeminiPlugin supports fp16/bf16 only ('precision fp32 is not supported', gemini_plugin.py:486)"
    if knobs.zero == 3 and knobs.optimizer != "adamw":
        return f"optimizer_{knobs.optimizer} with zero 3: Gemini steps with HybridAdam (AdamW mode) only here"
    if knobs.offload == "optimizer+params" and knobs.zero != 3:
        return "offload_params: Gemini (zero 3) places parameters; LowLevelZero offloads the optimizer only"
    return None


def plugin_for(knobs: Knobs):
    """The Colossal-AI plugin the cell names, with the settings its examples use."""
    from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin

    if knobs.zero in (1, 2):
        return LowLevelZeroPlugin(stage=knobs.zero, precision=knobs.precision, cpu_offload=knobs.offload != "none")
    return GeminiPlugin(precision=knobs.precision, placement_policy="static",
                        enable_gradient_accumulation=knobs.microbatches > 1,
                        offload_optim_frac=1.0 if knobs.offload != "none" else 0.0,
                        offload_param_frac=1.0 if knobs.offload == "optimizer+params" else 0.0)


def build_zero(knobs: Knobs, model: Decoder, device: torch.device, make_optimizer: Callable[[], Any],
               notes: dict[str, Any]) -> TrainStep:
    """``make_optimizer``: the adapter's optimizer for LowLevelZero; Gemini steps with HybridAdam."""
    from colossalai.booster import Booster

    plugin = plugin_for(knobs)
    if knobs.zero == 3:
        from colossalai.nn.optimizer import HybridAdam

        optimizer = HybridAdam(model.parameters(), lr=learning_rate(), betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                               adamw_mode=True)
    else:
        optimizer = make_optimizer()
    booster = Booster(plugin=plugin)
    model_w, optimizer_w, *_ = booster.boost(model, optimizer)
    notes.update(plugin=f"{type(plugin).__name__}(" + (
        f"stage={knobs.zero}, precision={knobs.precision!r}, cpu_offload={knobs.offload != 'none'})"
        if knobs.zero in (1, 2) else
        f"precision={knobs.precision!r}, placement_policy='static', offload={knobs.offload!r})"),
        optimizer_class=f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        booster_plugin_class=type(booster.plugin).__name__)

    def step(batch: Batch) -> torch.Tensor:
        optimizer_w.zero_grad()
        parts = batch.split(knobs.microbatches)
        total = torch.zeros(())
        for mb in parts:  # the plugins accumulate gradients across backward calls
            loss = lm_loss(model_w(mb.inputs), mb.targets) / len(parts)
            booster.backward(loss, optimizer_w)
            total += loss.detach().float().cpu()
        optimizer_w.step()
        return total

    return TrainStep(step, modules=[model_w.unwrap()], optimizers=[optimizer], notes=notes)
