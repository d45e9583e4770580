"""Techniques as predicates on a cell's knobs.

A cell *uses* a technique when its knobs ask for it (``zero: 2`` uses
``zero2``). Adapters declare their support per technique, so the support
matrix (`bench list`) and the pre-launch check read the same table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bench.config.knobs import Knobs


@dataclass(frozen=True, slots=True)
class Technique:
    name: str
    group: str
    uses: Callable[[Knobs], bool]


def _knob(name: str, value: object) -> Callable[[Knobs], bool]:
    return lambda k: getattr(k, name) == value


TECHNIQUES: tuple[Technique, ...] = (
    Technique("data_parallel", "parallelism", lambda k: k.dp > 1),
    Technique("tensor_parallel_1d", "parallelism", lambda k: k.tp > 1 and k.tp_mode == "1d"),
    Technique("tensor_parallel_2d", "parallelism", lambda k: k.tp > 1 and k.tp_mode == "2d"),
    Technique("tensor_parallel_2.5d", "parallelism", lambda k: k.tp > 1 and k.tp_mode == "2.5d"),
    Technique("tensor_parallel_3d", "parallelism", lambda k: k.tp > 1 and k.tp_mode == "3d"),
    Technique("sequence_parallel_megatron", "parallelism", _knob("sequence_parallel", "megatron")),
    Technique("sequence_parallel_ring", "parallelism", _knob("sequence_parallel", "ring")),
    *(
        Technique(f"pipeline_{s}", "parallelism", (lambda s: lambda k: k.pp > 1 and k.pp_schedule == s)(s))
        for s in ("gpipe", "1f1b", "interleaved", "pipedream", "zbv")
    ),
    Technique("zero1", "memory", _knob("zero", 1)),
    Technique("zero2", "memory", _knob("zero", 2)),
    Technique("zero3", "memory", _knob("zero", 3)),
    Technique("offload_optimizer", "memory", lambda k: k.offload != "none"),
    Technique("offload_params", "memory", _knob("offload", "optimizer+params")),
    Technique("checkpointing_full", "memory", _knob("checkpointing", "full")),
    Technique("checkpointing_selective", "memory", _knob("checkpointing", "selective")),
    Technique("checkpointing_every_k", "memory", lambda k: k.checkpointing == "full" and k.checkpoint_every > 1),
    Technique("grad_accumulation", "memory", lambda k: k.pp == 1 and k.microbatches > 1),
    Technique("precision_fp16", "precision", _knob("precision", "fp16")),
    Technique("precision_bf16", "precision", _knob("precision", "bf16")),
    *(
        Technique(f"optimizer_{o}", "optimizer", _knob("optimizer", o))
        for o in ("adamw", "sgd", "adafactor", "adam8bit", "onebit_adam", "onebit_lamb", "lamb", "lars")
    ),
    Technique("fusion_fused", "other", _knob("fusion", "fused")),
    Technique("fusion_compile", "other", _knob("fusion", "compile")),
    *(Technique(f"allreduce_{a}", "other", _knob("allreduce", a)) for a in ("ring", "tree", "ps", "ps_sharded")),
    *(
        Technique(f"attention_{a}", "attention", _knob("attention", a))
        for a in ("sliding_window", "dilated", "global", "random", "block_local", "longformer", "bigbird")
    ),
    Technique("strategy_auto", "other", _knob("strategy", "auto")),
    Technique("strategy_fsdp1", "memory", _knob("strategy", "fsdp1")),
    Technique("device_cuda", "device", _knob("device", "cuda")),
)

BY_NAME: dict[str, Technique] = {t.name: t for t in TECHNIQUES}


def used_by(knobs: Knobs) -> list[str]:
    return [t.name for t in TECHNIQUES if t.uses(knobs)]
