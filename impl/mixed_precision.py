"""Mixed-precision training: fp16 with fp32 master weights and dynamic loss scaling; bf16.

Micikevicius et al. 2017, "Mixed Precision Training":

* the model's parameters, activations and gradients are 16-bit; an fp32
  *master* copy of every weight is what the optimizer updates (§3.1), and the
  16-bit weights are re-derived from it after each step — small updates
  (|Δw| < 2⁻¹¹·|w|) that fp16 would round away accumulate in fp32;
* the loss is multiplied by a scale S before backward so small gradients do
  not flush to zero in fp16 (§3.2; fp16's smallest subnormal is 2⁻²⁴); the
  fp32 master gradients are multiplied by 1/S before the update;
* dynamic scaling: a gradient with inf/NaN means S was too large — skip the
  step and lower S; after a run of clean steps raise S again.

Model-state bytes per parameter (ZeRO paper §3.1, K = 12 for Adam): 16-bit
params 2, 16-bit grads 2, fp32 master 4 + Adam m 4 + v 4. The fp32 copy of the
gradients exists only inside ``step()`` (a 4Ψ transient, as in DeepSpeed's
fp16 optimizer, outside K).

bf16 has fp32's exponent range, so it needs no loss scaling; either keep fp32
parameters and run under ``torch.autocast(dtype=bfloat16)``
(``autocast_context("bf16", ...)``), or store bf16 params with fp32 masters
via ``MasterWeightOptimizer`` (its scaler is then disabled by default).

fp16 on this CPU (checked 2026-11-28, torch 2.13.0+cpu, 2 cores, AVX512 with
avx512_fp16 and amx_bf16): fp16 ``matmul``/``linear`` forward and backward
run natively and the tiny decoder trains in fp16 with finite gradients, so
the code uses real fp16 compute (no fp16-storage/fp32-compute fallback).
Speed, one thread, ``torch.utils.benchmark`` median, 512×512 matmul: fp32
2.39 ms (112 GFLOP/s), fp16 2.40 ms (112), bf16 0.72 ms (371, AMX); matmul
forward+backward: fp32 5.5 ms, fp16 7.2 ms (1.3× slower), bf16 1.7 ms. So fp16
saves memory here, not time; bf16 saves both. Tiny-model steps are
dispatch-bound (≈ 25 ms at any precision). On CPUs without avx512_fp16 fp16
matmuls may be far slower (DeepSpeed refuses fp16 there).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Literal

import torch
from torch import nn


class DynamicLossScaler:
    """Dynamic loss scale S, as DeepSpeed's ``DynamicLossScaler`` (0.19.8,
    ``deepspeed/runtime/fp16/loss_scaler.py``, itself from Megatron-LM).

    ``update(found_inf)``, with ``it`` counting calls and ``last`` the call
    index of the last overflow (−1 at start):

    * overflow: if ``hysteresis == 1`` or the hysteresis budget is down to 1,
      S ← max(S·backoff_factor, min_scale); otherwise spend one unit of the
      budget and keep S. The step is skipped either way (the optimizer's job).
    * clean step: with ``consecutive_hysteresis`` the budget is refilled.
      If ``it − last − 1`` is a positive multiple of ``growth_interval``, S ←
      S·growth_factor (and, without ``consecutive_hysteresis``, the budget is
      refilled). So the first growth comes on the (growth_interval+1)-th clean
      step after the start or an overflow, then every growth_interval steps
      (torch's GradScaler grows after growth_interval clean steps).

    Without ``consecutive_hysteresis`` (DeepSpeed's default) the budget is
    *not* refilled by clean steps: after ``hysteresis−1`` overflows anywhere
    since the last growth, every further overflow backs off. With it, S backs
    off only on the ``hysteresis``-th overflow in a row.

    Differences from DeepSpeed: S is clamped at ``min_scale`` instead of
    raising (DeepSpeed's ``raise_error_at_min_scale``); growth/backoff factors
    are separate (DeepSpeed uses one ``scale_factor``, 2).
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, hysteresis: int = 2, min_scale: float = 1.0, *,
                 consecutive_hysteresis: bool = False, enabled: bool = True) -> None:
        if not (growth_factor > 1 and 0 < backoff_factor < 1):
            raise ValueError(f"need growth_factor > 1 and 0 < backoff_factor < 1, got {growth_factor}, {backoff_factor}")
        if growth_interval < 1 or hysteresis < 1 or min_scale <= 0:
            raise ValueError(f"need growth_interval, hysteresis >= 1 and min_scale > 0, got "
                             f"{growth_interval}, {hysteresis}, {min_scale}")
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.hysteresis, self.min_scale = growth_interval, hysteresis, min_scale
        self.consecutive_hysteresis, self.enabled = consecutive_hysteresis, enabled
        self.loss_scale = float(init_scale) if enabled else 1.0
        self.hysteresis_left = hysteresis
        self.iteration = 0
        self.last_overflow_iteration = -1

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """S·loss, to call backward on."""
        return loss * self.loss_scale if self.enabled else loss

    def unscale_and_check(self, grads: list[torch.Tensor], group=None) -> bool:
        """grads ← grads / S in place (fp32 tensors: unscaling a 16-bit gradient
        would underflow the very values scaling protects); True if any is inf/NaN.
        With a process group the flag is all-reduced with MAX so every rank
        skips together (each rank may see a different overflow)."""
        for g in grads:
            if g.dtype != torch.float32:
                raise TypeError(f"unscale into fp32 gradients (got {g.dtype}); copy 16-bit grads to fp32 first")
        found = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
        if grads:
            if self.enabled and self.loss_scale != 1.0:
                torch._foreach_mul_(grads, 1.0 / self.loss_scale)
            # One flag per tensor, reduced once: no host sync per tensor.
            found = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
        return bool(found.item())

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            if self.hysteresis == 1 or self.hysteresis_left == 1:
                self.loss_scale = max(self.loss_scale * self.backoff_factor, self.min_scale)
            else:
                self.hysteresis_left -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if self.consecutive_hysteresis:
                self.hysteresis_left = self.hysteresis
            stable = self.iteration - self.last_overflow_iteration - 1
            if stable > 0 and stable % self.growth_interval == 0:
                if not self.consecutive_hysteresis:
                    self.hysteresis_left = self.hysteresis
                self.loss_scale *= self.growth_factor
        self.iteration += 1

    def state_dict(self) -> dict:
        return {"loss_scale": self.loss_scale, "hysteresis_left": self.hysteresis_left,
                "iteration": self.iteration, "last_overflow_iteration": self.last_overflow_iteration}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class MasterWeightOptimizer:
    """An optimizer over fp32 master copies of a 16-bit model's parameters.

    ``step()``: 16-bit grads → fp32 master grads; unscale by 1/S and check for
    inf/NaN (all ranks agree when ``group`` is given); on overflow skip the
    step entirely (params untouched), zero the grads and return False;
    otherwise the inner optimizer steps the masters and the masters are
    rounded back into the 16-bit params (round-to-nearest). The model's
    16-bit params stay the tensors the model owns, so hooks and plans that hold
    references to them keep working.
    """

    def __init__(self, model: nn.Module, make_inner: Callable[[list[torch.Tensor]], torch.optim.Optimizer], *,
                 scaler: DynamicLossScaler | None = None, group=None,
                 masters: Iterable[torch.Tensor] | None = None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if not dtypes <= {torch.float16, torch.bfloat16}:
            raise ValueError(f"expected a model cast to fp16 or bf16, got parameter dtypes {sorted(map(str, dtypes))}")
        init = [p.detach() for p in self.params] if masters is None else list(masters)
        self.masters = [m.detach().to(torch.float32, copy=True).requires_grad_() for m in init]
        self.scaler = scaler or DynamicLossScaler(enabled=torch.float16 in dtypes)
        self.group = group
        self.inner = make_inner(self.masters)
        self.skipped_steps = 0

    @classmethod
    def from_fp32_model(cls, model: nn.Module, dtype: torch.dtype,
                        make_inner: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                        **kwargs) -> "MasterWeightOptimizer":
        """Masters from the fp32 weights (exact), then the model's parameters are
        cast to ``dtype`` in place. Buffers (the RoPE tables) stay fp32."""
        masters = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        for p in model.parameters():
            p.data = p.data.to(dtype)
        return cls(model, make_inner, masters=masters, **kwargs)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    @torch.no_grad()
    def step(self) -> bool:
        """Returns True if the update was applied, False if skipped on overflow."""
        master_grads = []
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
            if m.grad is not None:
                master_grads.append(m.grad)
        # bf16 needs no loss scale and skips nothing: no inf check, so no host sync per step
        found_inf = self.scaler.enabled and self.scaler.unscale_and_check(master_grads, self.group)
        if self.scaler.enabled:
            self.scaler.update(found_inf)
        if found_inf:
            self.skipped_steps += 1
            self.zero_grad()
            return False
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)
            m.grad = None  # the fp32 grads are a transient of step(), not state
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        for t in (*self.params, *self.masters):
            if t.grad is not None and not set_to_none:
                t.grad.zero_()
            else:
                t.grad = None

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """For the model-state meter (``bench.meters.memory.model_state_bytes``)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        grads += [m.grad for m in self.masters if m.grad is not None]
        optim = list(self.masters)
        for per_param in self.inner.state.values():
            optim += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        return {"params": list(self.params), "grads": grads, "optimizer": optim}


Precision = Literal["fp32", "fp16", "bf16"]


def autocast_context(precision: Precision, device_type: str = "cpu"):
    """The forward context for a precision: bf16 runs under autocast with fp32
    parameters; fp32 and fp16 (a model cast to fp16, with master weights) need
    none."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision in ("fp32", "fp16"):
        return contextlib.nullcontext()
    raise ValueError(f"precision must be fp32, fp16 or bf16, not {precision!r}")
