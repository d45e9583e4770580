"""`strategy: fsdp1` on the `torch` adapter: PyTorch's original
``FullyShardedDataParallel`` wrapper, for users still on it.

zero 3 → ``ShardingStrategy.FULL_SHARD``, zero 2 → ``SHARD_GRAD_OP``,
zero 0 → ``NO_SHARD`` (FSDP1 has no ZeRO-1 strategy). The units are the ones
``impl/zero.py`` and the FSDP2 path use: the embedding and each block are
wrapped by the auto-wrap policy, the root owns the final norm and the head.
Parameters are flattened per unit (``use_orig_params=False``, FSDP1's
default). bf16 → ``MixedPrecision`` (parameters and reductions in bf16, fp32
sharded masters). On CPU FSDP1 needs ``device_id=torch.device("cpu")``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.config.knobs import Knobs
from impl.model import Block, Decoder
from impl.parallel_dims import ParallelDims

SHARDING = {3: "FULL_SHARD", 2: "SHARD_GRAD_OP", 0: "NO_SHARD"}


def why_not_fsdp1(knobs: Knobs) -> str | None:
    """What FSDP1 cannot do here, named by knob, before anything launches."""
    if knobs.zero not in SHARDING:
        return f"strategy_fsdp1: FSDP1 has no ZeRO-{knobs.zero} sharding strategy (zero 0, 2 or 3: NO_SHARD, SHARD_GRAD_OP, FULL_SHARD)"
    if knobs.tp > 1 or knobs.pp > 1:
        return "strategy_fsdp1: FSDP1 is data parallel only here (tp and pp compose with FSDP2, strategy: manual)"
    if knobs.offload == "optimizer":
        return "strategy_fsdp1: FSDP1's CPUOffload moves parameters, gradients and optimizer state together; use offload: optimizer+params"
    if knobs.offload == "optimizer+params" and knobs.device == "cpu":
        return "strategy_fsdp1: CPUOffload(offload_params=True) pins host memory, which fails without a GPU"
    if knobs.precision == "fp16":
        return "strategy_fsdp1: fp16 needs ShardedGradScaler, not wired (bf16 works)"
    if knobs.fusion == "compile":
        return "strategy_fsdp1: torch.compile needs use_orig_params=True; this strategy keeps FSDP1's flat-parameter default"
    return None


def wrap_fsdp1(model: Decoder, knobs: Knobs, dims: ParallelDims, device: torch.device,
               notes: dict[str, Any]) -> nn.Module:
    from torch.distributed.fsdp import CPUOffload
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    kwargs = {**fsdp1_kwargs(knobs, notes), "device_id": device, "use_orig_params": False}
    if knobs.offload == "optimizer+params":
        kwargs["cpu_offload"] = CPUOffload(offload_params=True)
    wrapped = FSDP(model, **kwargs)
    notes["wrapper"] = f"FSDP1 FullyShardedDataParallel({SHARDING[knobs.zero]}, use_orig_params=False)"
    notes.update(fsdp1_notes(knobs))
    return wrapped


def fsdp1_kwargs(knobs: Knobs, notes: dict[str, Any]) -> dict[str, Any]:
    """The FSDP1 settings both FSDP1 paths share (torch's wrapper and
    Colossal-AI's TorchFSDPPlugin): sharding strategy, units, bf16 policy."""
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kwargs: dict[str, Any] = {
        "sharding_strategy": getattr(ShardingStrategy, SHARDING[knobs.zero]),
        "auto_wrap_policy": ModuleWrapPolicy({Block, nn.Embedding}),
    }
    if knobs.precision == "bf16":
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        notes["precision"] = "FSDP1 MixedPrecision(param_dtype=bf16, reduce_dtype=bf16), fp32 sharded flat parameters"
    return kwargs


def fsdp1_notes(knobs: Knobs) -> dict[str, str]:
    """Where FSDP1 (torch's wrapper, or Colossal-AI's TorchFSDPPlugin around it)
    differs from the ZeRO formulas, and why."""
    notes = {}
    if knobs.zero == 3:
        notes["comm_vs_theory"] = ("FSDP1 never reshards the root unit (final norm + head) after forward, since "
                                   "backward needs it at once: those parameters are all-gathered once per step, not "
                                   "twice, so traffic is (3Ψ − Ψ_root)(N−1)/N instead of ZeRO-3's 3Ψ(N−1)/N")
    if knobs.precision == "bf16":
        notes["model_state_vs_theory"] = ("MixedPrecision casts for compute only: the sharded flat parameters and their "
                                          "gradients stay fp32 (4+4 B/param), the fp32 master is the parameter itself "
                                          "(optimizer 8 B/param); total 16 B/param as the theory")
    if knobs.zero == 2:
        notes["model_state_vs_theory"] = ("SHARD_GRAD_OP keeps the unsharded parameters between forward and backward "
                                          "but frees them after backward, so parameters at rest are sharded (Ψ/N)")
    return notes
