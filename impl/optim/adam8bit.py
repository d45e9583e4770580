"""8-bit AdamW: both moments held as block-wise dynamic-quantized uint8
(Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization",
arXiv 2110.02861).

The update is AdamW (Loshchilov & Hutter 2019; decoupled weight decay) with
bias correction, exactly as ``torch.optim.AdamW`` and bitsandbytes'
``Adam8bit``/``AdamW8bit`` compute it (bitsandbytes applies decoupled decay in
both; they differ only in the default ``weight_decay``).  For step t, with
g = grad, and the state dequantized first (Sec. 2):

    m   = dequant(m_q, N_m, Q_signed)            v = dequant(v_q, N_v, Q_unsigned)
    m   = b1 m + (1 - b1) g                      v = b2 v + (1 - b2) g^2
    p   = p (1 - lr wd)
    p   = p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    m_q, N_m = quant(m, Q_signed)                v_q, N_v = quant(v, Q_unsigned)

Memory per parameter of a quantized tensor: 1 + 1 bytes of codes plus
2 x 4 bytes of absmax per ``block_size`` values, i.e. 2 + 8 / block_size
bytes, against 8 bytes for fp32 Adam.  As in bitsandbytes, tensors with fewer
than ``min_8bit_size`` elements (norm gains, biases) keep fp32 moments: they
are a tiny share of memory and are the most sensitive to quantization noise.

Stable embedding (Sec. 3): bitsandbytes' ``StableEmbedding`` keeps 32-bit
optimizer state for the embedding weight.  Here that is ``fp32_state_for=``
(parameter tensors, or names when the optimizer is given
``model.named_parameters()``), or a parameter carrying the attribute
``FP32_STATE_ATTR`` set to True (``impl.stable_embedding.StableEmbedding`` sets
it on its weight).

Second-moment underflow guard (``keep_nonzero_v``, on by default; our
addition, not in the paper): with nearest rounding, an element whose v is
below ~1.6e-7 of its block's absmax rounds to v = 0 while its m (which scales
like sqrt(v), so sits ~4e-4 of its block max) does not; the next update is
then m / eps, thousands of times lr.  Blocks mixing rare and frequent rows
(embedding, LM head) hit this within tens of steps: on the tiny model a
20-step run moved some embedding weights by 4.5 (fp32 AdamW: <= ~0.02).
With the guard a non-zero v rounds up to the smallest positive code
(3.25e-7 N_v) instead, so v is only ever over-estimated there and the step
shrinks.  ``keep_nonzero_v=False`` gives plain nearest rounding for all
states, as the paper and bitsandbytes' CUDA kernel do.  bitsandbytes' CPU
kernel never hits this: its lookup-table quantizer sends every value below
~3e-5 of absmax, zero included, to a code of ~2e-5.

Block size: the paper uses 2048, the default here; bitsandbytes 0.50's
optimizers hard-code 256 (pass ``block_size=256`` to match them).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from impl.optim import run_closure
from impl.optim.quantization import DEFAULT_BLOCK_SIZE, create_dynamic_map, dequantize_blockwise, n_blocks, quantize_blockwise

FP32_STATE_ATTR = "optim_fp32_state"  # a parameter with this attribute set True keeps fp32 moments


class Adam8bit(torch.optim.Optimizer):
    """AdamW with 8-bit block-wise quantized moments (see module docstring for the math).

    State per 8-bit parameter p (n = p.numel(), B = ceil(n / block_size)):
      ``exp_avg_q`` uint8 like p, ``exp_avg_absmax`` fp32 (B,),
      ``exp_avg_sq_q`` uint8 like p, ``exp_avg_sq_absmax`` fp32 (B,), ``step`` int.
    State per fp32 parameter: ``exp_avg``, ``exp_avg_sq`` fp32 like p, ``step`` int.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        min_8bit_size: int = 4096,
        fp32_state_for: Iterable[torch.Tensor | str] = (),
        keep_nonzero_v: bool = True,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas={betas} must lie in [0, 1)")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps={eps} and weight_decay={weight_decay} must be >= 0")
        if block_size < 1 or min_8bit_size < 0:
            raise ValueError(f"block_size={block_size} must be >= 1 and min_8bit_size={min_8bit_size} >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size
        self.keep_nonzero_v = keep_nonzero_v
        wanted = list(fp32_state_for)
        self._fp32_ids = {id(t) for t in wanted if isinstance(t, torch.Tensor)}
        names = {t for t in wanted if isinstance(t, str)}
        known = {n for g in self.param_groups for n in g.get("param_names", ())}
        if names - known:
            raise ValueError(
                f"fp32_state_for names {sorted(names - known)} are not parameter names of this optimizer; "
                "pass model.named_parameters() to name parameters"
            )
        for g in self.param_groups:
            for name, p in zip(g.get("param_names", ()), g["params"]):
                if name in names:
                    self._fp32_ids.add(id(p))
        # The two 256-entry code maps are shared by every parameter (2 KiB in all).
        self.code_signed = create_dynamic_map(signed=True)
        self.code_unsigned = create_dynamic_map(signed=False)

    def quantizes(self, p: torch.Tensor) -> bool:
        """Whether p's moments are held in 8 bits."""
        forced = id(p) in self._fp32_ids or getattr(p, FP32_STATE_ATTR, False)
        return p.numel() >= self.min_8bit_size and not forced

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = 0
        if self.quantizes(p):
            blocks = n_blocks(p.numel(), self.block_size)
            for key in ("exp_avg", "exp_avg_sq"):
                # Code index of 0.0: all-zero moments start exact (signed map: index 127).
                zero = int((self._code(key) == 0).nonzero()[0])
                state[f"{key}_q"] = torch.full_like(p, zero, dtype=torch.uint8, memory_format=torch.contiguous_format)
                state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    def _code(self, key: str) -> torch.Tensor:
        return self.code_signed if key == "exp_avg" else self.code_unsigned

    def _load(self, state: dict, key: str) -> torch.Tensor:
        if key in state:
            return state[key]
        code = self._code(key).to(state[f"{key}_q"].device)
        return dequantize_blockwise(state[f"{key}_q"], state[f"{key}_absmax"].float(), code, self.block_size)

    def _store(self, state: dict, key: str, value: torch.Tensor) -> None:
        if key in state:  # fp32 state was updated in place
            return
        code = self._code(key).to(value.device)
        keep_nonzero = self.keep_nonzero_v and key == "exp_avg_sq"
        q, absmax = quantize_blockwise(value, code, self.block_size, keep_nonzero=keep_nonzero)
        state[f"{key}_q"].copy_(q)
        state[f"{key}_absmax"].copy_(absmax)

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adam8bit does not support sparse gradients")
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                m, v = self._load(state, "exp_avg"), self._load(state, "exp_avg_sq")
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p32 = p.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                p32.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
                if p32 is not p:
                    p.copy_(p32)
                self._store(state, "exp_avg", m)
                self._store(state, "exp_avg_sq", v)
        return loss


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors held in ``optimizer.state`` (each storage counted once),
    plus any shared code maps (``code_signed``/``code_unsigned``) the optimizer holds.
    Works for any torch optimizer: fp32 AdamW gives 8 bytes/param + 4 per step tensor."""
    seen: set[tuple[int, int]] = set()
    total = 0
    tensors = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    tensors += [getattr(optimizer, a) for a in ("code_signed", "code_unsigned") if hasattr(optimizer, a)]
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
