"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training
BERT in 76 minutes", arXiv 1904.00962, Algorithm 2): an Adam direction with
decoupled weight decay, rescaled per layer by a trust ratio.

    m_t = β1 m_{t−1} + (1 − β1) g_t
    v_t = β2 v_{t−1} + (1 − β2) g_t²
    r_t = m̂_t / (sqrt(v̂_t) + ε)           (m̂, v̂: see ``bias_correction``)
    u_t = r_t + λ x_t                      (decoupled weight decay, inside the ratio)
    x_{t+1} = x_t − η_t · φ(‖x_t‖) / ‖u_t‖ · u_t,    φ = identity (clipped at
              ``trust_clip`` if given); the ratio is 1 when ‖x‖ or ‖u‖ is 0.

``bias_correction`` (bc_k = 1 − β_k^t):
  * ``"moments"`` (Algorithm 2 of the ICLR 2020 version): m̂ = m/bc1, v̂ = v/bc2.
  * ``"lr"`` (pytorch-lamb / ``colossalai.nn.optimizer.Lamb(bias_correction=True)``):
    r = m/(sqrt(v)+ε) and η_t ← η·sqrt(bc2)/bc1. Because the trust ratio
    normalises u, this does *not* cancel as it does in "moments" mode: the whole
    step is multiplied by sqrt(bc2)/bc1, for β = (0.9, 0.999) 0.32 at t = 1,
    0.15 at t = 10, 0.80 at t = 1000 and → 1: a built-in slow warm-up.
  * ``"none"`` (arXiv v3; Colossal's default ``bias_correction=False``): m̂ = m, v̂ = v.

Groups carry a ``trust_ratio`` flag (see ``impl.optim.param_groups``); with it
False the step is the plain Adam(W) step η·u_t. Colossal's ``Lamb`` instead has
one optimizer-wide ``adam`` flag (trust ratio 1 for every group), so the
reference comparison runs one Colossal ``Lamb`` per group (``adam=False`` for
the matrices, ``adam=True`` for the 1-D group) on the same gradients.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from impl.optim import run_closure

BiasCorrection = Literal["moments", "lr", "none"]


class Lamb(torch.optim.Optimizer):
    """Layer-wise adaptive Adam; see the module docstring for the math.

    Args:
        lr: η.
        betas: (β1, β2).
        eps: ε, added to sqrt(v̂).
        weight_decay: λ, decoupled, inside the trust-ratio norm.
        bias_correction: ``"moments"``, ``"lr"`` or ``"none"`` (module docstring).
        trust_clip: upper bound on the trust ratio (None = unbounded).
    Per-group keys: all of the above plus ``trust_ratio`` (default True).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, bias_correction: BiasCorrection = "moments",
                 trust_clip: float | None = None) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        for i, beta in enumerate(betas):
            if not 0 <= beta < 1:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if bias_correction not in ("moments", "lr", "none"):
            raise ValueError(f"bias_correction must be 'moments', 'lr' or 'none', got {bias_correction!r}")
        if trust_clip is not None and trust_clip <= 0:
            raise ValueError(f"trust_clip must be > 0, got {trust_clip}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        trust_clip=trust_clip, trust_ratio=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            mode = group["bias_correction"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                bc1 = 1 - beta1 ** state["step"]
                bc2 = 1 - beta2 ** state["step"]

                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

                denom = exp_avg_sq.sqrt()
                if mode == "moments":
                    denom.div_(math.sqrt(bc2))  # sqrt(v̂)
                update = exp_avg / denom.add_(group["eps"])  # r_t (before 1/bc1)
                if mode == "moments":
                    update.div_(bc1)
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])  # u_t = r_t + λ x_t

                lr = group["lr"]
                if mode == "lr":
                    lr *= math.sqrt(bc2) / bc1
                ratio = 1.0
                if group["trust_ratio"]:
                    w_norm = p.norm(2).item()
                    u_norm = update.norm(2).item()
                    if w_norm > 0 and u_norm > 0:
                        ratio = w_norm / u_norm
                    if group["trust_clip"] is not None:
                        ratio = min(ratio, group["trust_clip"])
                p.add_(update, alpha=-lr * ratio)
        return loss
