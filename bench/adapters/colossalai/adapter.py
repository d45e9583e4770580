"""The `colossalai` adapter: Colossal-AI 0.5.0's Booster around the same decoder.

* TorchDDPPlugin (dp > 1): unmodified, on CPU and CUDA.
* TorchFSDPPlugin (``strategy: fsdp1``): Colossal-AI's wrapper of PyTorch FSDP1,
  with the torch adapter's mapping (``torch_fsdp1``): zero 3 FULL_SHARD,
  zero 2 SHARD_GRAD_OP, zero 0 NO_SHARD, the same wrap units, bf16 MixedPrecision.
* HybridParallelPlugin (tp > 1 and/or pp > 1, dp = 1): 1D tensor parallel,
  ``sequence_parallel: megatron`` → its split_gather sequence parallelism, and
  its 1F1B pipeline over ``microbatches``. Shardformer shards transformers
  models only, so these cells train ``LlamaForCausalLM`` built from the same
  config with the same weights (``colossalai_hf``; notes.model_type says so).
* LowLevelZero (zero 1/2) and Gemini (zero 3, fp16/bf16, HybridAdam) on CUDA
  (``colossalai_zero``); they assert a CUDA device, so on CPU those cells are
  unsupported with the assertion quoted, as is ZeRO inside HybridParallel.

On CPU, TorchFSDP and HybridParallel run only after small patches of CUDA-only
calls, all in ``colossalai_cpu_patches`` and applied only there; such records
carry ``notes.patched = True`` and ``notes.patches``, and the report marks them.
Colossal-AI is imported inside ``build`` only (``colossalai.booster.plugin``
costs ~5 s per rank).
"""
from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from typing import Any

import torch

from bench.adapters.base import ALL_DEVICES, Adapter, Capabilities, TrainStep
from bench.adapters.step import accumulating_step
from bench.adapters.torch.adapter import ddp_kwargs
from bench.config.framework_config import Setting, describe, settings_for
from bench.config.knobs import Knobs
from bench.config.techniques import used_by
from bench.workloads.train import BETAS, EPS, learning_rate, WEIGHT_DECAY, Batch, torch_optimizer
from impl.model import Decoder, lm_loss
from impl.parallel_dims import ParallelDims

CUDA_ONLY = frozenset({"cuda"})
# The blocking calls, as raised on this CPU machine (colossalai 0.5.0, torch 2.13):
_LOW_LEVEL_ZERO = ("LowLevelZeroPlugin: 'AssertionError: device is required' from "
                   "assert get_accelerator().name in ['cuda', 'npu'] (zero/low_level/low_level_optim.py:254)")
_GEMINI = ("GeminiPlugin: 'AssertionError: precision fp32 is not supported' (gemini_plugin.py:486), and with bf16 "
           "'RuntimeError: this method is not supported for cpu accelerator' (accelerator/cpu_accelerator.py:242)")
_NOT_MAPPED = "HybridParallelPlugin offers it, but this adapter maps only tp (1D, split_gather SP) and 1F1B pipelines"
# Under strategy fsdp1 these techniques are FSDP1's sharding strategy and MixedPrecision
# (run on CPU), not LowLevelZero/Gemini/torch.amp.
_FSDP1_OWNS = ("zero2", "zero3", "precision_bf16")


class ColossalAIAdapter(Adapter):
    name = "colossalai"
    description = ("Colossal-AI 0.5.0 Booster: TorchDDPPlugin; TorchFSDPPlugin and HybridParallelPlugin (tp, sp, 1F1B pp; "
                   "patched on CPU); LowLevelZero/Gemini on CUDA")
    capabilities = Capabilities(
        runs={
            **{t: ALL_DEVICES for t in (
                "data_parallel", "grad_accumulation", "optimizer_adamw", "optimizer_sgd", "optimizer_lamb",
                "optimizer_lars", "device_cuda", "strategy_fsdp1",
                # HybridParallelPlugin; on CPU after colossalai_cpu_patches (records say patched).
                "tensor_parallel_1d", "sequence_parallel_megatron", "pipeline_1f1b",
            )},
            "zero1": CUDA_ONLY,
            "zero2": CUDA_ONLY,
            "zero3": CUDA_ONLY,
            "offload_optimizer": CUDA_ONLY,
            "offload_params": CUDA_ONLY,
            "precision_bf16": CUDA_ONLY,
            "precision_fp16": CUDA_ONLY,
        },
        reasons={
            "zero1": _LOW_LEVEL_ZERO,
            "zero2": _LOW_LEVEL_ZERO,
            "zero3": _GEMINI,
            "offload_optimizer": _LOW_LEVEL_ZERO,
            "offload_params": _GEMINI,
            "precision_bf16": "Booster mixed precision goes through LowLevelZero/Gemini or torch.cuda.amp",
            "precision_fp16": "Booster mixed precision goes through LowLevelZero/Gemini or torch.cuda.amp",
            "tensor_parallel_2d": "Colossal-AI 0.5.0 removed the legacy 2D/2.5D/3D tensor-parallel layers",
            "tensor_parallel_2.5d": "Colossal-AI 0.5.0 removed the legacy 2D/2.5D/3D tensor-parallel layers",
            "tensor_parallel_3d": "Colossal-AI 0.5.0 removed the legacy 2D/2.5D/3D tensor-parallel layers",
            "pipeline_gpipe": "Colossal-AI 0.5.0 has no GPipe (all-forward-then-all-backward) schedule",
            "pipeline_pipedream": "Colossal-AI 0.5.0 has no asynchronous PipeDream schedule",
            "pipeline_interleaved": f"pp_style='interleaved': {_NOT_MAPPED}",
            "pipeline_zbv": f"pp_style='zbv': {_NOT_MAPPED}",
            "sequence_parallel_ring": f"sequence_parallelism_mode='ring_attn': {_NOT_MAPPED}",
            **{f"attention_{a}": "Colossal-AI 0.5.0 has no sparse attention (ColoAttention masks are only "
                                 "custom/padded/causal dense masks); not faked"
               for a in ("sliding_window", "dilated", "global", "random", "block_local", "longformer", "bigbird")},
        },
    )

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("colossalai") is None:
            return "colossalai is not installed (pip install --no-deps colossalai==0.5.0; see README)"
        return None

    def why_not(self, knobs: Knobs) -> str | None:
        if knobs.strategy == "fsdp1":
            from bench.adapters.torch.fsdp1 import why_not_fsdp1

            why = why_not_fsdp1(knobs)
            if why:
                return why
            reasons = [f"{t}: {why}" for t in used_by(knobs) if t not in _FSDP1_OWNS
                       and (why := self.capabilities.support(t, knobs.device))]
            return "; ".join(reasons) or None
        if knobs.tp > 1 or knobs.pp > 1:
            why = _why_not_hybrid(knobs)
            if why:
                return why
        elif knobs.device == "cuda":
            from bench.adapters.colossalai.zero import why_not_zero

            why = why_not_zero(knobs)
            if why:
                return why
        return super().why_not(knobs)

    def build(self, knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
        from colossalai.booster import Booster
        from colossalai.booster.plugin import TorchDDPPlugin

        notes: dict[str, Any] = {"model_type": "impl.model.Decoder", "patched": False}
        if knobs.strategy == "fsdp1":
            return _build_fsdp1(knobs, model, device, notes)
        if dims.tp > 1 or dims.pp > 1:
            return _build_hybrid(knobs, model, dims, device, notes)
        if knobs.zero:  # CUDA only (why_not refuses it elsewhere): LowLevelZero or Gemini
            from bench.adapters.colossalai.zero import build_zero

            notes["framework_config"] = describe(knobs, [])
            return build_zero(knobs, model, device, lambda: _optimizer(knobs, model), notes)
        optimizer = _optimizer(knobs, model)
        if dims.dp > 1:
            # Same DDP settings as the torch adapter (the RoPE buffers are identical on every rank).
            kwargs = ddp_kwargs(knobs)
            booster = Booster(plugin=TorchDDPPlugin(**kwargs))
            model_w, optimizer_w, *_ = booster.boost(model, optimizer)
            notes["plugin"] = f"TorchDDPPlugin({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
            forward, no_sync = model_w, lambda: booster.no_sync(model_w, optimizer_w)
            stepper = optimizer_w  # OptimizerWrapper: zero_grad()/step() as torch's
        else:
            forward, no_sync, stepper = model, nullcontext, optimizer
        step = accumulating_step(forward, stepper, microbatches=knobs.microbatches, no_sync=no_sync)
        notes["optimizer_class"] = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        notes["framework_config"] = describe(knobs, settings_for(knobs))
        return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes)


def _patch_on_cpu(device: torch.device, notes: dict[str, Any], *names: str) -> None:
    if device.type != "cpu":
        return
    from bench.adapters.colossalai.cpu_patches import apply_cpu_patches

    notes["patched"] = True
    notes["patches"] = apply_cpu_patches(*names)


def _build_fsdp1(knobs: Knobs, model: Decoder, device: torch.device, notes: dict[str, Any]) -> TrainStep:
    """TorchFSDPPlugin with the torch adapter's FSDP1 mapping (bench/adapters/torch/fsdp1.py):
    the same units (embedding, each block; the root owns norm + head) and strategies."""
    from colossalai.booster import Booster
    from colossalai.booster.plugin import TorchFSDPPlugin
    from colossalai.booster.plugin.torch_fsdp_plugin import FSDPOptimizerWrapper

    from bench.adapters.torch.fsdp1 import SHARDING, fsdp1_kwargs, fsdp1_notes

    _patch_on_cpu(device, notes, "fsdp_device_id")
    kwargs = fsdp1_kwargs(knobs, notes)
    model_w, *_ = Booster(plugin=TorchFSDPPlugin(**kwargs)).boost(model)
    # The optimizer is built on the FSDP flat parameters after boosting: the plugin's own
    # re-init (optimizer.__init__(params, **optimizer.defaults)) fails for torch 2.13's AdamW,
    # whose defaults carry 'decoupled_weight_decay', an argument AdamW.__init__ does not take.
    optimizer = _optimizer(knobs, model_w)
    stepper = FSDPOptimizerWrapper(optimizer, model_w)
    fsdp = model_w.module  # TorchFSDPModel wraps torch's FullyShardedDataParallel
    notes["plugin"] = f"TorchFSDPPlugin({SHARDING[knobs.zero]}, FSDP1 use_orig_params=False)"
    notes["optimizer_class"] = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    notes.update(fsdp1_notes(knobs))
    notes["framework_config"] = describe(knobs, [])
    # The plugin's no_sync raises NotImplementedError; FSDP1's own no_sync is the same context.
    step = accumulating_step(model_w, stepper, microbatches=knobs.microbatches, no_sync=fsdp.no_sync)
    return TrainStep(step, modules=[fsdp], optimizers=[optimizer], notes=notes)


def _why_not_hybrid(knobs: Knobs) -> str | None:
    """What the HybridParallelPlugin mapping cannot do, named by knob, before launch."""
    if knobs.dp > 1:
        return ("data_parallel with tp/pp > 1: not mapped (HybridParallelPlugin's ProcessGroupMesh rank order is not "
                "checked against the harness's dp coordinate); use dp = 1")
    if knobs.optimizer in ("lamb", "lars"):
        return (f"optimizer_{knobs.optimizer} with tp/pp: its trust ratio ‖w‖/‖update‖ would be taken per shard, "
                "not per whole parameter")
    if knobs.zero and knobs.device == "cpu":
        return f"zero{knobs.zero}: ZeRO inside HybridParallelPlugin is LowLevelZero: {_LOW_LEVEL_ZERO}"
    return None


def _build_hybrid(knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device,
                  notes: dict[str, Any]) -> TrainStep:
    """HybridParallelPlugin: 1D tensor parallel (+ split_gather sequence parallel) and
    1F1B pipelines, on transformers' Llama built from the same config and weights."""
    from colossalai.booster import Booster
    from colossalai.booster.plugin import HybridParallelPlugin

    from bench.adapters.colossalai.hf_model import MODEL_TYPE, to_llama

    _patch_on_cpu(device, notes, "cpu_accelerator_rng", *(("hccl_query",) if dims.pp > 1 else ()))
    hf = to_llama(model)
    del model  # the Decoder only lent its weights
    optimizer = _optimizer(knobs, hf)
    sp = knobs.sequence_parallel == "megatron"
    kwargs: dict[str, Any] = {
        "tp_size": dims.tp, "pp_size": dims.pp, "zero_stage": knobs.zero,
        "precision": knobs.precision,
        # Full (B, T, V) logits, gathered over the vocabulary, so the loss is lm_loss as everywhere else.
        "parallel_output": False,
    }
    if sp:
        kwargs.update(enable_sequence_parallelism=True, sequence_parallelism_mode="split_gather")
    if dims.pp > 1:
        kwargs["num_microbatches"] = knobs.microbatches
    booster = Booster(plugin=HybridParallelPlugin(**kwargs))
    model_w, optimizer_w, *_ = booster.boost(hf, optimizer)
    notes.update(model_type=MODEL_TYPE, optimizer_class=f"{type(optimizer).__module__}.{type(optimizer).__name__}",
                 plugin=f"HybridParallelPlugin(tp_size={dims.tp}, pp_size={dims.pp}, zero_stage={knobs.zero}"
                        + (", sequence_parallelism_mode='split_gather'" if sp else "")
                        + (f", 1F1B, {knobs.microbatches} micro-batches" if dims.pp > 1 else "") + ")")
    notes["framework_config"] = describe(knobs, [Setting(
        "HybridParallelPlugin.parallel_output", False, True,
        "the full (B, T, V) logits, gathered over the vocabulary, so the loss is lm_loss as in every other cell")])
    if dims.tp > 1:
        notes["comm_vs_theory"] = (
            "shardformer makes HF Llama's separate q/k/v and gate/up projections five Linear1D_Col layers, each "
            "all-reducing its input gradient in backward (Megatron's fused QKV and gate-up: two), so a block costs "
            "7 activation all-reduces, not 4; and parallel_output=False all-gathers the full (B, T, V) logits for the "
            "loss where Megatron's vocab-parallel cross-entropy (the theory) all-reduces 3 values per token")

    def inputs(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        # An explicit all-ones mask makes HF build the causal mask that shardformer's
        # eager attention (sequence parallel) adds; without one it would attend both ways.
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}

    if dims.pp > 1:
        def step(batch: Batch) -> torch.Tensor | None:
            optimizer_w.zero_grad()
            targets = iter(batch.targets.chunk(knobs.microbatches))  # the schedule's micro-batches, in order
            out = booster.execute_pipeline(iter([inputs(batch.inputs)]), model_w,
                                           lambda output, _mb: lm_loss(output.logits, next(targets)),
                                           optimizer_w, return_loss=True)
            optimizer_w.step()
            return None if out["loss"] is None else out["loss"].detach().float().cpu()
    else:
        def step(batch: Batch) -> torch.Tensor:
            optimizer_w.zero_grad()
            parts = batch.split(knobs.microbatches)
            total = torch.zeros(())
            for mb in parts:
                loss = lm_loss(model_w(**inputs(mb.inputs)).logits, mb.targets) / len(parts)
                booster.backward(loss, optimizer_w)  # also all-reduces the sequence-parallel norm gradients
                total += loss.detach().float().cpu()
            optimizer_w.step()
            return total

    return TrainStep(step, modules=[model_w.unwrap()], optimizers=[optimizer], notes=notes)


def _optimizer(knobs: Knobs, model: torch.nn.Module) -> torch.optim.Optimizer:
    if knobs.optimizer == "lamb":
        from colossalai.nn.optimizer import Lamb

        return Lamb(model.parameters(), lr=learning_rate(), betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if knobs.optimizer == "lars":
        from colossalai.nn.optimizer import Lars

        return Lars(model.parameters(), lr=learning_rate(), momentum=0.9, weight_decay=WEIGHT_DECAY)
    return torch_optimizer(knobs.optimizer, model.parameters())
