"""The `inhouse` adapter's optimizers: impl/optim classes with the workload's
hyper-parameters (bench/workloads/train.py), so every adapter's `optimizer: X` cell
trains with the same settings wherever the framework's optimizer allows."""
from __future__ import annotations

from typing import Iterable

import torch

from bench.workloads.train import BETAS, EPS, learning_rate, SGD_MOMENTUM, WEIGHT_DECAY, optimizer_spec

# Optimizers whose update is element-wise, so they can step ZeRO's flat shards.
# The others need whole tensors: Adafactor factors each matrix, LAMB/LARS take a
# per-layer norm, 1-bit optimizers own the gradient communication themselves.
ELEMENTWISE = ("adamw", "sgd", "adam8bit")
LAMB_EPS = 1e-6  # You et al. 2019
LARS_ETA = 1e-3  # trust coefficient η (You et al. 2017; Colossal-AI's default `eeta`)

NOTES = {
    "adamw": "torch.optim.AdamW",
    "sgd": "torch.optim.SGD (momentum 0.9)",
    "adafactor": "impl.optim.Adafactor.like_torch (lr-capped relative step, RMS parameter scaling; "
                 "equal to torch.optim.Adafactor)",
    "adam8bit": "impl.optim.Adam8bit (block 2048, dynamic map, fp32 state under 4096 values)",
    "lamb": "impl.optim.Lamb (paper bias correction; 1-D params: no trust ratio, no weight decay)",
    "lars": "impl.optim.Lars (η = 1e-3, momentum 0.9; 1-D params: no trust ratio, no weight decay)",
    "onebit_adam": "impl.optim.OneBitAdam (owns the gradient all-reduce; compressed after freeze_step)",
    "onebit_lamb": "impl.optim.OneBitLamb (owns the gradient all-reduce; compressed after freeze_step)",
}


def make_optimizer(name: str, named_params: Iterable[tuple[str, torch.Tensor]], *, group=None,
                   freeze_step: int = 1, fused: bool = False) -> torch.optim.Optimizer:
    """``named_params``: (name, tensor) pairs in model order (names decide the
    LAMB/LARS groups); ``group``: the data-parallel group 1-bit optimizers
    communicate on; ``fused``: AdamW's single-kernel multi-tensor step."""
    named = list(named_params)
    params = [p for _, p in named]
    if name in ("adamw", "sgd"):
        cls, kwargs = optimizer_spec(name)
        if fused and name == "adamw":
            kwargs = {**kwargs, "fused": True}
        return cls(params, **kwargs)
    if name == "adafactor":
        from impl.optim.adafactor import Adafactor

        return Adafactor.like_torch(params, lr=learning_rate(), weight_decay=WEIGHT_DECAY)
    if name == "adam8bit":
        from impl.optim.adam8bit import Adam8bit

        return Adam8bit(params, lr=learning_rate(), betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if name in ("lamb", "lars"):
        from impl.optim.param_groups import trust_ratio_groups

        groups = trust_ratio_groups(named, WEIGHT_DECAY)
        if name == "lamb":
            from impl.optim.lamb import Lamb

            return Lamb(groups, lr=learning_rate(), betas=BETAS, eps=LAMB_EPS)
        from impl.optim.lars import Lars

        return Lars(groups, lr=learning_rate(), momentum=SGD_MOMENTUM, eta=LARS_ETA)
    if name in ("onebit_adam", "onebit_lamb"):
        from impl.optim.onebit import OneBitAdam, OneBitLamb

        cls = OneBitAdam if name == "onebit_adam" else OneBitLamb
        return cls(params, lr=learning_rate(), betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, freeze_step=freeze_step,
                   group=group)
    raise ValueError(f"unknown optimizer {name!r}")


def extra_state(optimizer) -> list[torch.Tensor]:
    """Optimizer memory held outside ``optimizer.state`` (1-bit error feedback)."""
    inner = getattr(optimizer, "inner", optimizer)  # through a master-weight wrapper
    return [t for t in (getattr(inner, "worker_error", None), getattr(inner, "server_error", None)) if t is not None]


# Optimizers tensor parallelism (1D, 2D/2.5D, 3D) can step on shards: their update is
# element-wise: stepping a shard equals stepping the
# whole tensor. LAMB/LARS (per-tensor trust ratios), Adafactor (factored
# moments) and 8-bit Adam (block-wise scales) would see shard-shaped tensors.
TP_OPTIMIZERS = ("adamw", "sgd")
