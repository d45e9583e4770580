"""1-bit Adam (Tang et al. 2021, arXiv 2102.02888) and 1-bit LAMB (Li et al. 2021, arXiv 2104.06069).

These optimizers own all data-parallel gradient communication: wrap nothing
in data parallel, give each rank its local gradients and call ``step()``.
All parameters (every group, in order) live in one flat buffer, padded to a
multiple of 8·n, which is what goes on the wire; per-parameter state is views
into it. t counts steps from 1; T is ``freeze_step``.

Warm-up, t ≤ T (plain Adam / LAMB on the averaged gradient):
    g = (1/n) Σ_r g_r                                   fp32 all-reduce
    m ← β1·m + (1−β1)·g,   v ← β2·v + (1−β2)·g²
Compression, t > T (Tang et al. Alg. 1; v is frozen at v_T):
    m_r ← β1·m + (1−β1)·g_r                             local gradient, no all-reduce
    m ← compressed_allreduce(m_r)                       1-bit, error feedback (impl/compressed_allreduce.py)

Update, with m̂ = m/(1−β1^t), v̂ = v/(1−β2^min(t,T)) (or m̂ = m, v̂ = v with
``bias_correction=False``, as the papers and DeepSpeed write it):
    Adam:  p ← p − lr·(m̂/(√v̂ + ε) + wd·p)              decoupled decay: AdamW's convention and
                                                         DeepSpeed OnebitAdam's ``update += wd·p``
    LAMB:  u = m̂/(√v̂ + ε) + wd·p,  p ← p − lr·c·u      per parameter tensor, c below.

1-bit LAMB's coefficient c (Li et al. §3, as DeepSpeed OnebitLamb):
  warm-up  c_t = clip(‖p‖/‖u‖, min_coeff, max_coeff); c_frozen ← β_c·c_frozen + (1−β_c)·c_t
  at T+1   per-tensor momentum scale σ_l = ‖m_l‖/√numel_l; s_l = mean_l(σ_l)/σ_l. Each
           tensor's momentum is multiplied by s_l before compression and divided after, so one
           flat 1-bit scale fits every layer.
  t > T    ĝ = (m_t − β1·m_{t−1})/(1−β1)   (the gradient the averaged momentum implies)
           v_fresh ← β2·v_fresh + (1−β2)·ĝ²  (v_fresh = v_T at T)
           f = max((√v̂ + ε)/(√v̂_fresh + ε)), blended towards 1 by ‖m̂/(√v̂+ε)‖/‖u‖ when wd > 0,
           clipped to [factor_min, factor_max] and to last_f·(1 ± factor_threshold)
           c = c_frozen · f

Checkpoint restore is not supported: the error buffers are per rank (DeepSpeed
resets them on load).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from impl.compressed_allreduce import compressed_allreduce, compressed_allreduce_bus_bytes, padded_numel
from impl.optim import run_closure


def onebit_bus_bytes_per_step(numel: int, world: int, *, compressed: bool, bytes_per_grad: int = 4) -> float:
    """Bus bytes per rank of one optimizer step (nccl-tests factors): a warm-up step all-reduces
    numel gradients, 2(n−1)/n·numel·bytes_per_grad; a compressed step is one compressed all-reduce
    of the fp32 momentum (signs plus 4-byte scales)."""
    if compressed:
        return compressed_allreduce_bus_bytes(numel, world, scale_bytes=4)
    return 2 * (world - 1) / world * numel * bytes_per_grad


def onebit_volume_ratio(warmup_fraction: float, bits_ratio: float) -> float:
    """Whole-run communication of full-precision training ÷ that of 1-bit training:
    1/(w + (1−w)/r) for a warm-up fraction w of the steps and per-step compression r
    (≈ 32 against fp32 gradients, 16 against fp16; Tang et al. §4)."""
    if not 0 <= warmup_fraction <= 1 or bits_ratio <= 0:
        raise ValueError(f"need 0 ≤ warmup_fraction ≤ 1 and bits_ratio > 0, got {warmup_fraction}, {bits_ratio}")
    return 1 / (warmup_fraction + (1 - warmup_fraction) / bits_ratio)


class _OneBitOptimizer(torch.optim.Optimizer):
    """Flat buffers, the warm-up all-reduce and the compressed momentum exchange; subclasses update.

    Args: ``params``, ``lr``, ``betas``, ``eps``, ``weight_decay`` as AdamW; ``freeze_step`` T,
    the number of full-precision warm-up steps; ``group`` the data-parallel process group
    (None: the world). ``bias_correction=True`` makes warm-up equal torch.optim.AdamW;
    False is the papers' (and DeepSpeed's, which ignores its own flag) uncorrected form.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 freeze_step: int, group=None, *, bias_correction: bool = True, **defaults) -> None:
        if freeze_step < 1:
            raise ValueError(f"freeze_step must be ≥ 1 (the variance needs warm-up steps), got {freeze_step}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **defaults))
        if not dist.is_initialized():
            raise RuntimeError("1-bit optimizers communicate: initialise torch.distributed first")
        self.freeze_step, self.group, self.bias_correction = freeze_step, group, bias_correction
        self.world = dist.get_world_size(group)
        self.steps = 0
        params = [p for g in self.param_groups for p in g["params"]]
        self.numel = sum(p.numel() for p in params)
        n_pad = padded_numel(self.numel, self.world)

        def zeros(k: int) -> torch.Tensor:
            return torch.zeros(k, dtype=params[0].dtype, device=params[0].device)

        self.grad_flat = zeros(n_pad)  # (N_pad,) averaged (warm-up) or local (compression) gradient
        self.exp_avg_flat = zeros(n_pad)  # (N_pad,) the buffer compressed_allreduce exchanges
        self.exp_avg_sq_flat = zeros(self.numel)
        self.worker_error = zeros(n_pad)  # e_r
        self.server_error = zeros(n_pad // self.world)  # ε_r for the chunk this rank serves
        self._layout: list[tuple[dict, torch.Tensor, torch.Tensor]] = []  # (group, param, grad view)
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                sl = slice(offset, offset + p.numel())
                offset += p.numel()
                st = self.state[p]
                st["exp_avg"] = self.exp_avg_flat[sl].view_as(p)
                st["exp_avg_sq"] = self.exp_avg_sq_flat[sl].view_as(p)
                self._layout.append((group, p, self.grad_flat[sl].view_as(p)))

    @property
    def compressing(self) -> bool:
        """Whether the next step() uses compressed communication."""
        return self.steps >= self.freeze_step

    def wire_bytes_per_step(self, *, compressed: bool) -> float:
        """Theoretical bus bytes per rank of one step of this optimizer (see onebit_bus_bytes_per_step)."""
        return onebit_bus_bytes_per_step(self.numel, self.world, compressed=compressed,
                                         bytes_per_grad=self.grad_flat.element_size())

    def _bias(self, beta: float, t: int) -> float:
        return 1 - beta ** t if self.bias_correction else 1.0

    @torch.no_grad()
    def step(self, closure=None):
        """One step from this rank's local ``p.grad``; communicates (collective: call on every rank)."""
        loss = run_closure(closure)
        self.steps += 1
        for _, p, g in self._layout:
            if p.grad is None:
                g.zero_()  # every rank must send the same layout
            else:
                g.copy_(p.grad)
        if self.steps <= self.freeze_step:
            flat = self.grad_flat[:self.numel]
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world)
            for group, p, g in self._layout:
                st = self.state[p]
                beta1, beta2 = group["betas"]
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                self._warmup_update(group, p, st)
        else:
            self._before_compression()
            for group, p, g in self._layout:
                beta1 = group["betas"][0]
                self.state[p]["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
            self._scale_momentum(up=True)
            self.exp_avg_flat[self.numel:].zero_()  # padding carries no momentum (DeepSpeed pads with zeros)
            self.exp_avg_flat.copy_(compressed_allreduce(self.exp_avg_flat, self.worker_error, self.server_error, self.group))
            self._scale_momentum(up=False)
            for group, p, _ in self._layout:
                self._compressed_update(group, p, self.state[p])
        return loss

    def _before_compression(self) -> None:
        pass

    def _scale_momentum(self, *, up: bool) -> None:
        pass

    def _warmup_update(self, group: dict, p: torch.Tensor, st: dict) -> None:
        raise NotImplementedError

    def _compressed_update(self, group: dict, p: torch.Tensor, st: dict) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict) -> None:
        raise NotImplementedError("1-bit optimizers keep per-rank error buffers; restoring them is not supported")


class OneBitAdam(_OneBitOptimizer):
    """1-bit Adam: AdamW during warm-up, then frozen variance and 1-bit momentum all-reduce."""

    def _adam_update(self, group: dict, p: torch.Tensor, st: dict) -> None:
        # Same operation order as torch.optim.AdamW's single-tensor path.
        beta1, beta2 = group["betas"]
        bc1 = self._bias(beta1, self.steps)
        bc2 = self._bias(beta2, min(self.steps, self.freeze_step))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (st["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(group["eps"])
        p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / bc1)

    _warmup_update = _adam_update
    _compressed_update = _adam_update


class OneBitLamb(_OneBitOptimizer):
    """1-bit LAMB: LAMB during warm-up, then frozen variance and trust ratio with the paper's
    per-step rescaling factor, and 1-bit all-reduce of layer-wise rescaled momentum."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 freeze_step: int, group=None, *, bias_correction: bool = True, max_coeff: float = 10.0,
                 min_coeff: float = 0.01, coeff_beta: float = 0.9, factor_max: float = 4.0,
                 factor_min: float = 0.5, factor_threshold: float = 0.1) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, freeze_step, group,
                         bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff)
        self.coeff_beta, self.factor_max, self.factor_min = coeff_beta, factor_max, factor_min
        self.factor_threshold = factor_threshold
        for _, p, _ in self._layout:
            self.state[p].update(coeff_frozen=0.0, last_factor=1.0, lamb_coeff=1.0)

    def _warmup_update(self, group: dict, p: torch.Tensor, st: dict) -> None:
        beta1, beta2 = group["betas"]
        m_hat = st["exp_avg"] / self._bias(beta1, self.steps)
        update = m_hat / ((st["exp_avg_sq"] / self._bias(beta2, self.steps)).sqrt() + group["eps"])
        if group["weight_decay"] > 0:
            update += group["weight_decay"] * p
        w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
        coeff = 1.0
        if w_norm > 0 and u_norm > 0:
            coeff = min(max((w_norm / u_norm).item(), group["min_coeff"]), group["max_coeff"])
            st["coeff_frozen"] = self.coeff_beta * st["coeff_frozen"] + (1 - self.coeff_beta) * coeff
        st["lamb_coeff"] = coeff
        p.add_(update, alpha=-group["lr"] * coeff)
        if self.steps == self.freeze_step:
            st["exp_avg_sq_fresh"] = st["exp_avg_sq"].clone()

    def _before_compression(self) -> None:
        if "scaling_coeff" not in self.state[self._layout[0][1]]:
            # Li et al. §3.2: after warm-up, rescale each tensor's momentum to the mean scale.
            sigma = [(torch.linalg.vector_norm(self.state[p]["exp_avg"]) / math.sqrt(p.numel())).item()
                     for _, p, _ in self._layout]
            united = sum(sigma) / len(sigma)
            for (_, p, _), s in zip(self._layout, sigma):
                self.state[p]["scaling_coeff"] = united / s if s > 0 else 1.0
        for _, p, _ in self._layout:
            self.state[p]["exp_avg_last"] = self.state[p]["exp_avg"].clone()  # m_{t−1}, averaged, unscaled

    def _scale_momentum(self, *, up: bool) -> None:
        for _, p, _ in self._layout:
            st = self.state[p]
            if up:
                st["exp_avg"].mul_(st["scaling_coeff"])
            else:
                st["exp_avg"].div_(st["scaling_coeff"])

    def _compressed_update(self, group: dict, p: torch.Tensor, st: dict) -> None:
        beta1, beta2 = group["betas"]
        m = st["exp_avg"]
        g_hat = (m - beta1 * st["exp_avg_last"]) / (1 - beta1)
        st["exp_avg_sq_fresh"].mul_(beta2).addcmul_(g_hat, g_hat, value=1 - beta2)
        denom = (st["exp_avg_sq"] / self._bias(beta2, self.freeze_step)).sqrt() + group["eps"]
        update_pre = (m / self._bias(beta1, self.steps)) / denom
        update = update_pre + group["weight_decay"] * p if group["weight_decay"] > 0 else update_pre
        denom_fresh = (st["exp_avg_sq_fresh"] / self._bias(beta2, self.steps)).sqrt() + group["eps"]
        factor = (denom / denom_fresh).max().item()
        if group["weight_decay"] > 0:
            ratio = min(1.0, (torch.linalg.vector_norm(update_pre) / torch.linalg.vector_norm(update)).item())
            factor = factor * ratio + (1 - ratio)
        factor = min(max(factor, self.factor_min), self.factor_max)
        last = st["last_factor"]
        factor = min(max(factor, last * (1 - self.factor_threshold)), last * (1 + self.factor_threshold))
        st["last_factor"] = factor
        st["lamb_coeff"] = st["coeff_frozen"] * factor
        p.add_(update, alpha=-group["lr"] * st["lamb_coeff"])
