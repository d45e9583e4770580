"""The `megatron` adapter: Megatron-Core 0.16.1, the reference system for 1D
tensor parallelism, Megatron sequence parallelism, 1F1B/interleaved pipelines
and the distributed optimizer, training the same decoder with the same weights
(``bench.adapters.megatron.model``).

Knobs → Megatron:

* dp/tp/pp → ``parallel_state.initialize_model_parallel`` with rank order
  ``tp-cp-ep-pp-dp`` (the harness's ``ParallelDims`` order, so every rank of a
  tensor-parallel group gets the same batch; Megatron's default is tp-cp-ep-dp-pp);
* ``sequence_parallel: megatron`` → ``TransformerConfig.sequence_parallel``;
* ``microbatches`` with ``pp_schedule: 1f1b | interleaved`` → Megatron's
  ``get_forward_backward_func()`` (1F1B, or interleaved 1F1B with
  ``virtual_stages`` model chunks); without a pipeline, its no-pipelining
  schedule accumulates gradients over the micro-batches;
* ``zero: 1`` → the distributed optimizer (optimizer states sharded over dp,
  gradients reduce-scattered and parameters all-gathered). ZeRO-2/3 have no
  Megatron-Core equivalent outside Megatron-FSDP, which this adapter does not map;
* ``checkpointing: full | selective`` → ``recompute_granularity`` (full:
  uniform, ``checkpoint_every`` layers per unit; selective: core attention);
* ``precision: bf16 | fp16`` → Megatron's mixed-precision model and optimizer
  (fp16 with its dynamic loss scaler), CUDA only;
* context parallelism needs Transformer Engine's attention in Megatron: unsupported.

Megatron's DistributedDataParallel and optimizer run with their defaults
(no overlap, no bucket padding, grads in the param dtype), which the record
lists in ``notes.megatron``; two settings differ, each recorded with its reason
(``notes.framework_config``). On CPU the calls in ``cpu_patches`` are patched
(records say ``patched``).
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

from bench.adapters.base import ALL_DEVICES, Adapter, Capabilities, TrainStep
from bench.config.knobs import Knobs
from impl.model import Decoder
from impl.parallel_dims import ParallelDims

CUDA_ONLY = frozenset({"cuda"})
_NO_TE = ("context parallelism in Megatron-Core needs Transformer Engine's attention "
          "(TEDotProductAttention); the local spec's DotProductAttention refuses cp > 1")
_FSDP = ("Megatron-Core shards gradients and parameters only in Megatron-FSDP "
         "(use_megatron_fsdp), which this adapter does not map; zero 1 is the distributed optimizer")
_MIXED = "wired for CUDA (Float16Module + Megatron's mixed-precision optimizer); not run on CPU"


class MegatronAdapter(Adapter):
    name = "megatron"
    description = ("Megatron-Core 0.16.1 GPTModel: 1D TP, sequence parallel, 1F1B/interleaved pipelines, "
                   "distributed optimizer (zero 1), recompute; patched on CPU")
    capabilities = Capabilities(
        runs={
            **{t: ALL_DEVICES for t in (
                "data_parallel", "grad_accumulation", "optimizer_adamw", "optimizer_sgd", "device_cuda", "tensor_parallel_1d",
                "sequence_parallel_megatron", "pipeline_1f1b", "pipeline_interleaved", "zero1",
                "checkpointing_full", "checkpointing_selective", "checkpointing_every_k")},
            "precision_bf16": CUDA_ONLY,
            "precision_fp16": CUDA_ONLY,
        },
        reasons={
            "precision_bf16": _MIXED,
            "precision_fp16": _MIXED,
            "sequence_parallel_ring": _NO_TE,
            "zero2": _FSDP,
            "zero3": _FSDP,
            "offload_optimizer": "Megatron's optimizer CPU offload needs Transformer Engine's HybridDeviceOptimizer",
            "offload_params": "Megatron-Core does not offload parameters",
            "pipeline_gpipe": "Megatron-Core schedules 1F1B and interleaved 1F1B only",
            "pipeline_pipedream": "Megatron-Core has no asynchronous PipeDream schedule",
            "pipeline_zbv": "zero-bubble schedules are not in Megatron-Core 0.16.1",
            "tensor_parallel_2d": "Megatron has 1D tensor parallelism only",
            "tensor_parallel_2.5d": "Megatron has 1D tensor parallelism only",
            "tensor_parallel_3d": "Megatron has 1D tensor parallelism only",
            **{f"optimizer_{o}": "Megatron-Core's optimizer factory builds Adam(W) and SGD (and Muon) only"
               for o in ("adafactor", "adam8bit", "onebit_adam", "onebit_lamb", "lamb", "lars")},
            "fusion_fused": "Megatron's fused kernels (Adam, RMSNorm, RoPE, softmax) come from apex or Transformer "
                            "Engine, neither installed; the cells run the unfused local spec",
            "fusion_compile": "Megatron-Core does not torch.compile its modules; not mapped",
            **{f"allreduce_{a}": "the hand-written all-reduce algorithms replace the backend collective in the "
                                 "in-house adapter only; Megatron's DDP calls the backend's all-reduce"
               for a in ("ring", "tree", "ps", "ps_sharded")},
            **{f"attention_{a}": "Megatron-Core's local DotProductAttention has only dense causal/padding masks; "
                                 "sparse patterns are not faked"
               for a in ("sliding_window", "dilated", "global", "random", "block_local", "longformer", "bigbird")},
            "strategy_auto": "the planner plans in-house cells only",
            "strategy_fsdp1": "PyTorch FSDP1 is a torch/colossalai strategy; Megatron's own is Megatron-FSDP (not mapped)",
        },
    )

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
            return "megatron-core is not installed (pip install --no-deps megatron-core==0.16.1; see README)"
        return None

    def why_not(self, knobs: Knobs) -> str | None:
        v = knobs.virtual_stages if knobs.pp > 1 and knobs.pp_schedule == "interleaved" else 1
        from impl.model_config import PRESETS

        cfg = PRESETS[knobs.model]
        if cfg.n_layers % (knobs.pp * v):
            return (f"pp × virtual_stages = {knobs.pp * v} does not divide the model's {cfg.n_layers} layers "
                    f"(Megatron splits layers evenly)")
        if cfg.n_kv_heads % knobs.tp or cfg.vocab_size % knobs.tp:
            return f"tp = {knobs.tp} must divide n_kv_heads = {cfg.n_kv_heads} and the vocabulary"
        if knobs.pp > 1 and knobs.pp_schedule == "interleaved":
            if knobs.pp == 2:
                return ("Megatron-Core's interleaved schedule at pp = 2 trained with wrong losses here (step-0 loss "
                        "6.934062 against the reference's 6.934394, tiny; exact at pp = 4): with two stages a rank's "
                        "previous and next stage are one rank, and its batched forward and backward sends to it are "
                        "same-shape, untagged messages")
            if knobs.microbatches % knobs.pp:
                return "Megatron's interleaved schedule needs microbatches divisible by pp"
        if knobs.framework_config == "tuned":
            return "framework_config: tuned has no Megatron search space yet (default and theory only)"
        return super().why_not(knobs)

    def build(self, knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
        notes: dict[str, Any] = {"model_type": "megatron.core.models.gpt.GPTModel", "patched": False}
        if device.type == "cpu":
            from bench.adapters.megatron.cpu_patches import apply_cpu_patches

            notes["patches"], notes["patched"] = apply_cpu_patches(), True
        from bench.adapters.megatron.train import build_step

        return build_step(knobs, model, dims, device, notes)
