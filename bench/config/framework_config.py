"""How each framework is configured in a cell: the `framework_config` knob.

* ``default`` (the default): every framework as its own documentation sets it
  up — its defaults, or its documented performance recommendations — except
  where it cannot run the cell otherwise; each such exception is recorded with
  its rule and reason.
* ``theory``: the settings that make a framework's traffic match the paper's
  volume (DeepSpeed ZeRO-3 that gathers every parameter twice and prefetches
  nothing). Only the theory-validation cells should use it: it is not how
  users run the framework, and the report never divides a ``theory`` cell by
  a ``default`` one.
* ``tuned``: a small search per framework over the knobs its own docs say
  matter (buckets, overlap, prefetch), every adapter with the same budget
  (``TUNING_BUDGET`` candidates at most); each candidate is a cell of its own
  (``tuning_candidate``) and the analysis keeps the best by launch median,
  as the DeepSpeed autotuner compares best against best.

This module is data: the documented defaults, the rules that replace them,
and the tuning spaces. The adapters read it (``settings_for``) and put
``describe``'s summary in every record's ``notes.framework_config``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Knobs = Any
"""A ``bench.config.knobs.Knobs``; not imported, since the knobs check `tuning_candidate` with this module."""

TUNING_BUDGET = 4
"""Candidates per tuned cell, the same for every adapter (the in-house one included)."""

DEEPSPEED_DEFAULTS: dict[str, Any] = {
    # deepspeed/runtime/zero/config.py (0.19.8) and https://www.deepspeed.ai/docs/config-json/
    "zero_optimization.reduce_bucket_size": int(5e8),
    "zero_optimization.allgather_bucket_size": int(5e8),
    "zero_optimization.overlap_comm": None,  # None: True for stage 3, False otherwise
    "zero_optimization.stage3_prefetch_bucket_size": int(5e7),
    "zero_optimization.stage3_param_persistence_threshold": int(1e5),
    "zero_optimization.stage3_max_reuse_distance": int(1e9),
    "pipeline.partition_method": "parameters",  # deepspeed.pipe.PipelineModule
}
TORCH_DDP_DEFAULTS: dict[str, Any] = {
    # torch.nn.parallel.DistributedDataParallel
    "ddp.bucket_cap_mb": 25,
    "ddp.broadcast_buffers": True,
    "ddp.gradient_as_bucket_view": False,
}
FSDP2_DEFAULTS: dict[str, Any] = {"fsdp2.explicit_prefetch": 0}  # implicit prefetching only
INHOUSE_DEFAULTS: dict[str, Any] = {"ddp.bucket_cap_mb": 25, "zero.prefetch": True}

_BROADCAST_BUFFERS = ("the model's only buffers are the RoPE tables, constant and identical on every rank: "
                      "re-broadcasting them every forward is traffic no user with constant buffers keeps")
_CAP = ("DeepSpeed's 5e8-element default allocates a 5e8-element gradient bucket (~1.9 GB fp32) per rank on any "
        "model; capped at Ψ, the whole model, one bucket still holds every gradient, so the collectives are the "
        "same as with the default")
_THEORY_BUCKET = ("Ψ/8 (at least the largest parameter): a few buckets per step; the bucket count changes the "
                  "number of calls, not the volume")


@dataclass(frozen=True, slots=True)
class Setting:
    """One framework setting a cell uses: its value, the framework's default and why they differ."""

    name: str
    value: Any
    default: Any
    reason: str = ""

    @property
    def differs(self) -> bool:
        return self.value != self.default


def describe(knobs: Knobs, settings: list[Setting]) -> dict[str, Any]:
    """``notes.framework_config``: the mode, and every setting that differs from the framework's default."""
    out: dict[str, Any] = {
        "mode": knobs.framework_config,
        "non_default": [{"setting": s.name, "value": s.value, "default": s.default, "reason": s.reason}
                        for s in settings if s.differs],
    }
    if knobs.framework_config == "tuned":
        space = tuning_space(knobs)
        out["tuning"] = {"candidate": knobs.tuning_candidate, "of": len(space), "budget": TUNING_BUDGET,
                         "overrides": space[knobs.tuning_candidate]}
    return out


def psi(knobs: Knobs) -> int:
    from impl.model import total_params
    from impl.model_config import PRESETS

    return total_params(PRESETS[knobs.model])


def deepspeed_settings(knobs: Knobs, psi_: int, largest: int) -> list[Setting]:
    """The DeepSpeed engine settings this cell uses (buckets in elements)."""
    d = DEEPSPEED_DEFAULTS
    capped = int(min(d["zero_optimization.reduce_bucket_size"], max(psi_, largest, 1)))
    theory_bucket = int(min(max(math.ceil(psi_ / 8), largest, 1), 5e8))
    mode = knobs.framework_config
    bucket, bucket_reason = (theory_bucket, _THEORY_BUCKET) if mode == "theory" else (capped, _CAP)
    out: list[Setting] = []
    if knobs.pp == 1:
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            out.append(Setting(f"zero_optimization.{key}", bucket, d[f"zero_optimization.{key}"], bucket_reason))
        out.append(Setting("zero_optimization.overlap_comm", None, None))
    if knobs.zero == 3:
        if mode == "theory":
            why = ("theory mode: every parameter is released after use and gathered again for backward, "
                   "3Ψ(N−1)/N per step as in ZeRO §7.2.2; costs overlap and is not how DeepSpeed is run")
            out += [
                Setting("zero_optimization.stage3_prefetch_bucket_size", 0, d["zero_optimization.stage3_prefetch_bucket_size"],
                        why + " (a prefetched parameter whose next use is skipped stays gathered: 1.2Ψ instead "
                              "of 2Ψ gathered in backward on `tiny`)"),
                Setting("zero_optimization.stage3_param_persistence_threshold", 0,
                        d["zero_optimization.stage3_param_persistence_threshold"],
                        why + " (the default keeps parameters under 1e5 elements whole on every rank, never gathered)"),
                Setting("zero_optimization.stage3_max_reuse_distance", 0, d["zero_optimization.stage3_max_reuse_distance"],
                        why),
            ]
        else:
            out += [Setting(k, d[k], d[k]) for k in (
                "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
                "zero_optimization.stage3_max_reuse_distance")]
    if knobs.pp > 1:
        method = "uniform" if mode == "theory" else "parameters"
        out.append(Setting("pipeline.partition_method", method, d["pipeline.partition_method"],
                           "theory mode: equal block counts per stage, the cut the other adapters and the pipeline "
                           "theory use" if method == "uniform" else ""))
    return _apply_tuning(knobs, out)


def torch_ddp_settings(knobs: Knobs) -> list[Setting]:
    d = TORCH_DDP_DEFAULTS
    return _apply_tuning(knobs, [
        Setting("ddp.bucket_cap_mb", d["ddp.bucket_cap_mb"], d["ddp.bucket_cap_mb"]),
        Setting("ddp.broadcast_buffers", False, d["ddp.broadcast_buffers"], _BROADCAST_BUFFERS),
        Setting("ddp.gradient_as_bucket_view", d["ddp.gradient_as_bucket_view"], d["ddp.gradient_as_bucket_view"]),
    ])


def fsdp2_settings(knobs: Knobs) -> list[Setting]:
    return _apply_tuning(knobs, [Setting("fsdp2.explicit_prefetch", 0, FSDP2_DEFAULTS["fsdp2.explicit_prefetch"])])


def inhouse_settings(knobs: Knobs) -> list[Setting]:
    d = INHOUSE_DEFAULTS
    return _apply_tuning(knobs, [Setting(k, v, v) for k, v in d.items()])


def settings_for(knobs: Knobs) -> list[Setting]:
    """The data-parallel wrapper settings a `torch` or `colossalai` cell uses: FSDP2 for
    zero ≥ 2, DDP for dp > 1 (zero 0/1); none for FSDP1, one rank, or model parallelism
    (their settings are in the record's notes, all the framework's defaults)."""
    if knobs.strategy == "fsdp1" or knobs.pp > 1 or (knobs.adapter == "colossalai" and knobs.tp > 1):
        return []
    if knobs.adapter == "torch" and knobs.zero >= 2:
        return fsdp2_settings(knobs)
    return torch_ddp_settings(knobs) if knobs.dp > 1 else []


def value(settings: list[Setting], name: str) -> Any:
    return next(s.value for s in settings if s.name == name)


def tuning_space(knobs: Knobs) -> list[dict[str, Any]]:
    """The candidates a `tuned` cell tries: overrides of named settings, at most
    ``TUNING_BUDGET``; the first is the `default` configuration. Each list holds
    the knobs the framework's own docs name for communication performance:
    DeepSpeed's ZeRO docs bucket sizes and overlap_comm (and the pipeline's
    partition method), DDP's bucket_cap_mb and gradient_as_bucket_view, FSDP2's
    explicit forward/backward prefetch, the in-house DDP bucket and ZeRO prefetch."""
    p = psi(knobs)
    mb = max(4 * p / 8 / 2**20, 1e-3)  # Ψ/8 fp32 bytes, in MiB
    small = max(math.ceil(p / 8), 1)
    if knobs.adapter == "deepspeed":
        if knobs.pp > 1:
            return [{}, {"pipeline.partition_method": "uniform"}]
        if knobs.zero == 0:
            return [{}]  # stage 0 reduces with the engine's fixed 5e8-element all-reduce bucket
        default_overlap = knobs.zero == 3
        return [{}, {"zero_optimization.overlap_comm": not default_overlap},
                {"zero_optimization.reduce_bucket_size": small, "zero_optimization.allgather_bucket_size": small},
                {"zero_optimization.reduce_bucket_size": small, "zero_optimization.allgather_bucket_size": small,
                 "zero_optimization.overlap_comm": not default_overlap}]
    if knobs.pp > 1 or knobs.tp > 1 or knobs.cp > 1:
        return [{}]
    if knobs.adapter == "inhouse":
        if knobs.zero:
            return [{}, {"zero.prefetch": False}]
        return [{}, {"ddp.bucket_cap_mb": mb}]
    if knobs.adapter in ("torch", "colossalai") and knobs.zero >= 2 and knobs.strategy != "fsdp1":
        return [{}, {"fsdp2.explicit_prefetch": 1}] if knobs.adapter == "torch" else [{}]
    # Not both together: torch DDP with gradient_as_bucket_view and Ψ/8 buckets hung a 2-rank gloo cell (seen once).
    return [{}, {"ddp.gradient_as_bucket_view": True}, {"ddp.bucket_cap_mb": mb}]


def _apply_tuning(knobs: Knobs, settings: list[Setting]) -> list[Setting]:
    if knobs.framework_config != "tuned":
        return settings
    overrides = tuning_space(knobs)[knobs.tuning_candidate]
    reason = f"tuned: candidate {knobs.tuning_candidate} of the search (bench/config/framework_config.py)"
    out = [Setting(s.name, overrides[s.name], s.default, reason) if s.name in overrides else s for s in settings]
    missing = set(overrides) - {s.name for s in settings}
    out += [Setting(n, overrides[n], None, reason) for n in sorted(missing)]
    return out
