"""Adafactor (Shazeer & Stern 2018, arXiv 1804.04235): a second moment in
O(n+m) memory per n×m matrix and, by default, no first moment.

For a gradient G_t (n, m) with β̂2_t = 1 − t^τ (τ = ``beta2_decay`` = −0.8,
paper Sec. 7.2), row/column running averages of the squared gradient
(Alg. 4; means instead of sums, which is the same V̂):

    R_t = β̂2_t R_{t−1} + (1 − β̂2_t) mean_j(G_t² + ε1)          (n, 1)
    C_t = β̂2_t C_{t−1} + (1 − β̂2_t) mean_i(G_t² + ε1)          (1, m)
    V̂_t = R_t C_t / mean(R_t)                                  rank-1, (n, m)

A vector keeps the unfactored V̂_t = β̂2_t V̂_{t−1} + (1 − β̂2_t)(G_t² + ε1).
A tensor with more than two dims is factored over its last two dims.
Then (Alg. 4 lines 7–8, Sec. 5 update clipping with threshold d):

    U_t = G_t / sqrt(V̂_t),    Û_t = U_t / max(1, RMS(U_t) / d)
    ρ_t = min(cap, 1/sqrt(t))  (relative step, cap = 1e-2 or ``lr``), else ρ_t = lr
    α_t = max(ε2, RMS(X_{t−1})) ρ_t   (parameter scaling, Sec. 8), else α_t = ρ_t
    X_t = (1 − γλ) X_{t−1} − α_t Û_t  (decoupled decay, γ = lr or the cap)

With ``beta1`` set, a first moment of the clipped update is kept,
M_t = β1 M_{t−1} + (1 − β1) Û_t, and X moves by α_t M_t (costs n·m floats).

``eps_placement`` picks where ε1 goes:
  * ``"paper"``: added to G² inside the averages as above (ε1 = 1e-30).
  * ``"torch"``: as ``torch.optim.Adafactor`` does: the averages take bare G²,
    then V̂ = R C / max(mean(R), ε1) and U = G / max(sqrt(V̂), ε1) (ε1 = the
    dtype's machine epsilon when None). ``Adafactor.like_torch`` builds this
    configuration; it runs the same ops in the same order as torch's
    single-tensor path so the two agree to the last bit or two.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from impl.optim import run_closure

PAPER_RHO_CAP = 1e-2  # Sec. 8: rho_t = min(1e-2, 1/sqrt(t))


class Adafactor(torch.optim.Optimizer):
    """Factored-second-moment optimizer; see the module docstring for the math.

    Args:
        lr: with ``relative_step`` the cap on ρ_t (None = the paper's 1e-2);
            without it the fixed ρ. Also the γ of decoupled weight decay.
        beta2_decay: τ in β̂2_t = 1 − t^τ (≤ 0).
        eps: (ε1, ε2). ε1 regularises the second moment (see
            ``eps_placement``; None = machine epsilon of the param dtype);
            ε2 floors RMS(X) in parameter scaling.
        d: update clipping threshold (≥ 1).
        beta1: first-moment coefficient; None keeps no first moment.
        weight_decay: λ of decoupled weight decay X ← (1 − γλ) X.
        relative_step: ρ_t = min(cap, 1/sqrt(t)) instead of a fixed lr.
        scale_parameter: multiply ρ_t by max(ε2, RMS(X_{t−1})).
        eps_placement: ``"paper"`` or ``"torch"`` (module docstring).
    """

    def __init__(
        self,
        params,
        lr: float | None = None,
        *,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (1e-30, 1e-3),
        d: float = 1.0,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        relative_step: bool = True,
        scale_parameter: bool = True,
        eps_placement: Literal["paper", "torch"] = "paper",
    ) -> None:
        if lr is None and not relative_step:
            raise ValueError("Adafactor needs lr when relative_step=False")
        if lr is not None and lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if beta2_decay > 0:
            raise ValueError(f"beta2_decay must be <= 0, got {beta2_decay}")
        if d < 1:
            raise ValueError(f"clipping threshold d must be >= 1, got {d}")
        if beta1 is not None and not 0 <= beta1 < 1:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if eps_placement not in ("paper", "torch"):
            raise ValueError(f"eps_placement must be 'paper' or 'torch', got {eps_placement!r}")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, beta1=beta1, weight_decay=weight_decay,
                        relative_step=relative_step, scale_parameter=scale_parameter, eps_placement=eps_placement)
        super().__init__(params, defaults)

    @classmethod
    def like_torch(cls, params, lr: float = 1e-2, *, beta2_decay: float = -0.8,
                   eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0,
                   weight_decay: float = 0.0) -> "Adafactor":
        """The configuration of ``torch.optim.Adafactor(params, lr, ...)``: its lr
        caps ρ_t and scales weight decay; parameter scaling is always on."""
        return cls(params, lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                   relative_step=True, scale_parameter=True, eps_placement="torch")

    def _init_state(self, p: Tensor, beta1: float | None) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            if p.dim() > 1:
                state["row_var"] = p.new_zeros(p.shape[:-1] + (1,))  # (..., n, 1)
                state["col_var"] = p.new_zeros(p.shape[:-2] + (1, p.shape[-1]))  # (..., 1, m)
            else:
                state["variance"] = torch.zeros_like(p)  # (n,)
            if beta1 is not None:
                state["exp_avg"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("Adafactor supports dense real tensors only")
                self._update(p, p.grad, self._init_state(p, group["beta1"]), group)
        return loss

    def _update(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        eps1, eps2 = group["eps"]
        if eps1 is None:
            eps1 = torch.finfo(p.dtype).eps
        torch_eps = group["eps_placement"] == "torch"
        add_eps = 0.0 if torch_eps else eps1  # paper: G² + ε1 inside the averages

        state["step"] += 1
        t = float(state["step"])
        one_minus_beta2 = t ** group["beta2_decay"]  # 1 − β̂2_t
        cap = group["lr"] if group["lr"] is not None else PAPER_RHO_CAP
        rho = min(cap, 1 / t**0.5) if group["relative_step"] else group["lr"]
        alpha = rho
        if group["scale_parameter"]:
            # RMS of X_{t−1}, taken before weight decay (as torch does)
            alpha = max(eps2, p.norm(2).item() / (p.numel() ** 0.5)) * rho

        if group["weight_decay"] != 0:
            p.mul_(1 - cap * group["weight_decay"])

        if grad.dim() > 1:
            row_var, col_var = state["row_var"], state["col_var"]
            # mean over the last dim of G² without an (n, m) temporary
            row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
            col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
            if add_eps:
                row_mean.add_(add_eps)
                col_mean.add_(add_eps)
            row_var.lerp_(row_mean, one_minus_beta2)  # R ← β̂2 R + (1 − β̂2) mean_j
            col_var.lerp_(col_mean, one_minus_beta2)
            var_estimate = row_var @ col_var  # (n, 1) @ (1, m) -> (n, m)
            denom = row_var.mean(dim=-2, keepdim=True)
            var_estimate.div_(denom.clamp_(min=eps1) if torch_eps else denom)
        else:
            variance = state["variance"]
            grad_sq = grad * grad
            if add_eps:
                grad_sq.add_(add_eps)
            variance.lerp_(grad_sq, one_minus_beta2)
            var_estimate = variance.clone()

        if torch_eps:
            var_estimate.clamp_(min=eps1 * eps1)  # = max(sqrt(V̂), ε1) after rsqrt
        update = var_estimate.rsqrt_().mul_(grad)  # U = G / sqrt(V̂)
        clip = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * group["d"]))
        if group["beta1"] is None:
            p.add_(update, alpha=-alpha / clip)
            return
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(update.div_(clip), 1 - group["beta1"])  # M ← β1 M + (1 − β1) Û
        p.add_(exp_avg, alpha=-alpha)


def state_numel_bound(shape: torch.Size | tuple[int, ...], beta1: bool = False) -> int:
    """Floats of Adafactor state for one tensor: n + m per (…, n, m) slice
    (O(n+m) for a matrix), n for a vector, plus the full size with a first moment."""
    numel = math.prod(shape)
    if len(shape) > 1:
        lead = math.prod(shape[:-2])
        second = lead * (shape[-2] + shape[-1])
    else:
        second = numel
    return second + (numel if beta1 else 0)
