"""How a cell is named and grouped in reports: its non-default knobs."""
from __future__ import annotations

import json
from typing import Any

from bench.config.knobs import Knobs

DEFAULTS = {name: field.default for name, field in Knobs.model_fields.items()}
LABEL_KNOBS = ("strategy", "world_size", "cp", "tp", "tp_mode", "tp_depth", "pp", "virtual_stages", "pp_balance", "zero", "offload", "precision", "optimizer", "microbatches", "checkpointing",
               "checkpoint_every", "freeze_step",
               "allreduce", "fusion", "attention", "sequence_parallel", "pp_schedule", "workload", "message_bytes", "fault",
               "framework_config", "tuning_candidate", "lr")


def cell_label(config: dict[str, Any], *, drop: tuple[str, ...] = (), always: tuple[str, ...] = ("world_size",)) -> str:
    """``k=v`` for each label knob that differs from its default (and those in
    ``always``), in config order, leaving out ``drop``."""
    return " ".join(f"{k}={v}" for k, v in config.items()
                    if (k in LABEL_KNOBS or k in always) and k not in drop and (k in always or v != DEFAULTS.get(k)))


def config_key(config: dict[str, Any], drop: tuple[str, ...]) -> str:
    """The config without ``drop`` (nor ``dp``, derived from the degrees): cells
    with equal keys differ only in the dropped knobs."""
    return json.dumps({k: v for k, v in config.items() if k not in drop and k != "dp"}, sort_keys=True)
