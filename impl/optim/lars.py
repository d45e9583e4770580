"""LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional
Networks", arXiv 1708.03888, Algorithm 1): SGD with momentum whose step is
rescaled per layer by a local learning rate.

    λ_t = η ‖w_t‖ / (‖g_t‖ + β ‖w_t‖ + ε)     (trust ratio; 1 when ‖w‖ or ‖g‖ is 0,
                                               clipped at ``trust_clip`` if given)
    d_t = g_t + β w_t                         (L2 weight decay, β = ``weight_decay``;
                                               clamped to ±``grad_clip`` if given)

``momentum_on`` picks where γ_t λ_t enters:
  * ``"update"`` (the paper): v_{t+1} = m v_t + γ_t λ_t d_t;   w_{t+1} = w_t − v_{t+1}
  * ``"gradient"`` (NUS-HPC LARS-ImageNet / ``colossalai.nn.optimizer.Lars``):
    b_{t+1} = m b_t + d_t (b_1 = d_1, as torch SGD);   w_{t+1} = w_t − γ_t λ_t b_{t+1}.
    Here the current ratio rescales the whole history, the paper's does not.
They agree whenever λ and γ are constant. ``Lars.like_colossal`` also sets
Colossal's fixed ``trust_clip=50`` and ``grad_clip=10``.

Groups carry a ``trust_ratio`` flag (see ``impl.optim.param_groups``); with it
False, λ = 1 and the step is SGD with momentum on d_t. Colossal's per-group
``lars`` flag does the same but also drops weight decay when False; the helper's
1-D group has weight decay 0, so with its groups the two coincide.
"""
from __future__ import annotations

from typing import Literal

import torch

from impl.optim import run_closure


class Lars(torch.optim.Optimizer):
    """Layer-wise adaptive SGD; see the module docstring for the math.

    Args:
        lr: γ (the global learning rate).
        momentum: m.
        eta: η, the trust coefficient (Colossal's ``eeta``).
        weight_decay: β.
        eps: ε in the trust-ratio denominator.
        trust_clip: upper bound on λ (None = unbounded).
        grad_clip: element-wise clamp of d_t (None = none).
        momentum_on: ``"update"`` (paper) or ``"gradient"`` (Colossal).
    Per-group keys: all of the above plus ``trust_ratio`` (default True).
    """

    def __init__(self, params, lr: float = 1e-3, *, momentum: float = 0.9, eta: float = 1e-3,
                 weight_decay: float = 0.0, eps: float = 0.0, trust_clip: float | None = None,
                 grad_clip: float | None = None, momentum_on: Literal["update", "gradient"] = "update") -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if weight_decay < 0 or eps < 0:
            raise ValueError(f"weight_decay and eps must be >= 0, got {weight_decay}, {eps}")
        if momentum_on not in ("update", "gradient"):
            raise ValueError(f"momentum_on must be 'update' or 'gradient', got {momentum_on!r}")
        defaults = dict(lr=lr, momentum=momentum, eta=eta, weight_decay=weight_decay, eps=eps,
                        trust_clip=trust_clip, grad_clip=grad_clip, momentum_on=momentum_on, trust_ratio=True)
        super().__init__(params, defaults)

    @classmethod
    def like_colossal(cls, params, lr: float = 1e-3, momentum: float = 0.0, eeta: float = 1e-3,
                      weight_decay: float = 0.0, epsilon: float = 0.0) -> "Lars":
        """The math of ``colossalai.nn.optimizer.Lars`` with the same arguments."""
        return cls(params, lr, momentum=momentum, eta=eeta, weight_decay=weight_decay, eps=epsilon,
                   trust_clip=50.0, grad_clip=10.0, momentum_on="gradient")

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            wd, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                ratio = 1.0
                if group["trust_ratio"]:
                    w_norm = p.norm(2).item()
                    g_norm = grad.norm(2).item()
                    if w_norm > 0 and g_norm > 0:
                        ratio = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    if group["trust_clip"] is not None:
                        ratio = min(ratio, group["trust_clip"])
                d = grad.add(p, alpha=wd) if wd != 0 else grad
                if group["grad_clip"] is not None:
                    d = d.clamp(-group["grad_clip"], group["grad_clip"])
                local_lr = group["lr"] * ratio
                if momentum == 0:
                    p.add_(d, alpha=-local_lr)
                    continue
                state = self.state[p]
                if group["momentum_on"] == "update":
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"].mul_(momentum).add_(d, alpha=local_lr)  # v
                    p.sub_(buf)
                else:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                        buf = state["momentum_buffer"]
                    else:
                        buf = state["momentum_buffer"].mul_(momentum).add_(d)  # b
                    p.add_(buf, alpha=-local_lr)
        return loss
