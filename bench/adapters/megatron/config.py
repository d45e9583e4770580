"""The Megatron settings a cell uses: rank order, optimizer configuration, and
the settings that differ from Megatron's defaults with their reasons."""
from __future__ import annotations

from typing import Any

import torch

from bench.config.framework_config import Setting
from bench.config.knobs import Knobs
from bench.workloads.train import BETAS, EPS, SGD_MOMENTUM, WEIGHT_DECAY, learning_rate

RANK_ORDER = "tp-cp-ep-pp-dp"


def settings(knobs: Knobs) -> list[Setting]:
    """The Megatron settings a cell uses that differ from Megatron's defaults, with reasons."""
    return [
        Setting("parallel_state.order", RANK_ORDER, "tp-cp-ep-dp-pp",
                "the harness hands each rank the batch of its dp coordinate in ParallelDims' order (tp fastest, "
                "then pp, then dp), so Megatron's groups must be the same"),
        Setting("optimizer.config_overrides", "{} (weight decay on every parameter)",
                "no weight decay on biases and 1-D parameters",
                "every adapter trains AdamW with decay on all parameters, so losses compare like for like"),
        Setting("optimizer.clip_grad", 0.0, 1.0, "no adapter clips gradients (the reference does not)"),
    ]


def optimizer_config(knobs: Knobs) -> Any:
    from megatron.core.optimizer import OptimizerConfig

    sgd = knobs.optimizer == "sgd"  # the harness's SGD: momentum 0.9, no weight decay
    return OptimizerConfig(
        optimizer="sgd" if sgd else "adam", lr=learning_rate(), weight_decay=0.0 if sgd else WEIGHT_DECAY,
        sgd_momentum=SGD_MOMENTUM, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_eps=EPS, decoupled_weight_decay=True, clip_grad=0.0, use_distributed_optimizer=knobs.zero == 1,
        bf16=knobs.precision == "bf16", fp16=knobs.precision == "fp16", params_dtype=dtype(knobs))


def dtype(knobs: Knobs) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[knobs.precision]

