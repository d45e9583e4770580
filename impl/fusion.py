"""Operator fusion, applied from outside the model, each fused op beside its
unfused reference (as llm.c keeps numbered kernel variants next to a CPU
reference and validates every one before timing it).

Ops and variants (``VARIANTS``: name -> (reference, fused)):

* ``swiglu/*``: ``silu(x W1^T) * (x W3^T)`` (Shazeer 2020, eq. 6 without W2).
  ``cat`` does one GEMM on ``cat([W1, W3])`` per call; ``packed`` is an
  autograd Function doing one GEMM on a zero-copy (2F, D) view when W1 and W3
  sit back to back in one storage (``pack_swiglu_weights``), saving only
  x and the (N, 2F) pre-activations (the reference also keeps silu(a));
  ``compiled`` is the reference under inductor.
* ``add_rmsnorm/*``: ``h = x + y; out = rmsnorm(h)`` returning (h, out).
  ``function`` saves h and the (N, 1) inverse RMS only; ``compiled`` is the
  reference under inductor.
* ``adamw/*``: one AdamW step over lists of tensors (mutated in place):
  single-tensor ``for``-loop reference, ``foreach`` (multi-tensor) and
  ``fused`` (one kernel per dtype/device; supported on CPU since torch 2.4).

``apply_fusion(model, mode)`` swaps forwards on the Decoder's blocks and
keeps every parameter and state_dict key; ``validate_fusion`` compares a
fused model with an unfused twin before anything is timed.
"""
from __future__ import annotations

import types
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adamw import adamw as _adamw

FusionMode = Literal["none", "fused", "compile"]
OptimizerImpl = Literal["for-loop", "foreach", "fused"]

# Max error, relative to the largest |reference| value of each tensor, that
# validation accepts. fp32 differences come only from GEMM/reduction order.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _lazy_compile(fn: Callable) -> Callable:
    """torch.compile on first call, so importing this module stays cheap."""
    compiled: list[Callable] = []

    def call(*args):
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=False))
        return compiled[0](*args)

    call.__name__ = f"{fn.__name__}_compiled"
    return call


# --- SwiGLU -----------------------------------------------------------------

def swiglu_reference(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """x (..., D), w1/w3 (F, D) -> (..., F); exactly FeedForward's inner part."""
    return F.silu(F.linear(x, w1)) * F.linear(x, w3)


def swiglu_cat(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One GEMM against cat([w1, w3]) (a (2F, D) copy every call)."""
    a, b = F.linear(x, torch.cat((w1, w3))).chunk(2, dim=-1)
    return F.silu(a) * b


def _packed_view(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """(2F, D) view over w1 then w3 when they are adjacent in one storage,
    otherwise a concatenated copy."""
    adjacent = (w1.is_contiguous() and w3.is_contiguous() and w1.shape == w3.shape
                and w1.untyped_storage().data_ptr() == w3.untyped_storage().data_ptr()
                and w3.storage_offset() == w1.storage_offset() + w1.numel())
    if adjacent:
        return w1.detach().as_strided((2 * w1.shape[0], w1.shape[1]), w1.stride())
    return torch.cat((w1.detach(), w3.detach()))


class _SwiGLUPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w3):
        w13 = _packed_view(w1, w3)
        h = F.linear(x, w13)  # (..., 2F): [a | b]
        a, b = h.chunk(2, dim=-1)
        ctx.save_for_backward(x, h, w1, w3)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, g):
        x, h, w1, w3 = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        da, db = dh.chunk(2, dim=-1)  # written in place: no concatenation
        torch.mul(g, F.silu(a), out=db)
        # aten's silu_backward: g * sig(a) * (1 + a * (1 - sig(a))) in one pass
        torch.ops.aten.silu_backward.grad_input(g * b, a, grad_input=da)
        dh2 = dh.flatten(0, -2)  # (N, 2F)
        dx = (dh2 @ _packed_view(w1, w3)).view_as(x)
        dw13 = dh2.t() @ x.flatten(0, -2)  # (2F, D): one GEMM for both weights
        n = w1.shape[0]
        return dx, dw13[:n], dw13[n:]


def swiglu_packed(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return _SwiGLUPacked.apply(x, w1, w3)


def pack_swiglu_weights(ffn: nn.Module) -> bool:
    """Move w1 and w3 into one (2F, D) storage (same Parameter objects, same
    values and names) so ``swiglu_packed`` needs no copy. True if packed."""
    w1, w3 = ffn.w1.weight, ffn.w3.weight
    if w1.shape != w3.shape:
        return False
    w13 = torch.cat((w1.detach(), w3.detach()))
    with torch.no_grad():
        w1.data, w3.data = w13[: w1.shape[0]], w13[w1.shape[0]:]
    return True


swiglu_compiled = _lazy_compile(swiglu_reference)


# --- residual add + RMSNorm -------------------------------------------------

def add_rmsnorm_reference(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + y; out = RMSNorm(h) computed as impl.model.RMSNorm does."""
    h = x + y
    hf = h.float()
    out = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).type_as(h) * weight
    return h, out


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight, eps):
        h = x + y
        hf = h.float()
        rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(h, rstd, weight)
        return h, (hf * rstd).type_as(h) * weight

    @staticmethod
    def backward(ctx, gh, gout):
        h, rstd, weight = ctx.saved_tensors
        nhat = h.float() * rstd
        gout = gout.float()
        gw = (gout * nhat.type_as(h).float()).flatten(0, -2).sum(0).to(weight.dtype)
        dn = gout * weight.float()
        # d/dh of w*h*r: r * (dn - nhat * mean(dn * nhat)), r = (mean(h^2)+eps)^-1/2
        dh = rstd * (dn - nhat * (dn * nhat).mean(-1, keepdim=True))
        if gh is not None:
            dh = dh + gh.float()
        dh = dh.to(h.dtype)
        return dh, dh, gw, None


def add_rmsnorm_function(x, y, weight, eps):
    return _AddRMSNorm.apply(x, y, weight, eps)


add_rmsnorm_compiled = _lazy_compile(add_rmsnorm_reference)


# --- AdamW step -------------------------------------------------------------

ADAMW_HPARAMS = dict(lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8,
                     amsgrad=False, maximize=False)


def fused_optimizer_kwargs(mode: FusionMode | OptimizerImpl) -> dict:
    """torch.optim.AdamW kwargs for a fusion knob or an implementation name.
    Spelled out because torch's default on CPU is the for-loop."""
    kwargs = {"none": {"foreach": False, "fused": False},
              "for-loop": {"foreach": False, "fused": False},
              "foreach": {"foreach": True, "fused": False},
              "fused": {"foreach": False, "fused": True},
              "compile": {"foreach": False, "fused": True}}
    if mode not in kwargs:
        raise ValueError(f"unknown fusion/optimizer mode {mode!r}; known: {', '.join(kwargs)}")
    return dict(kwargs[mode])


def _adamw_step(impl: OptimizerImpl):
    def step(params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
        """One AdamW step in place; steps are float32 scalar tensors."""
        _adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, **fused_optimizer_kwargs(impl), **ADAMW_HPARAMS)

    step.__name__ = f"adamw_{impl.replace('-', '_')}"
    return step


adamw_for_loop, adamw_foreach, adamw_fused = (_adamw_step(i) for i in ("for-loop", "foreach", "fused"))


VARIANTS: dict[str, tuple[Callable, Callable]] = {
    "swiglu/cat": (swiglu_reference, swiglu_cat),
    "swiglu/packed": (swiglu_reference, swiglu_packed),
    "swiglu/compiled": (swiglu_reference, swiglu_compiled),
    "add_rmsnorm/function": (add_rmsnorm_reference, add_rmsnorm_function),
    "add_rmsnorm/compiled": (add_rmsnorm_reference, add_rmsnorm_compiled),
    "adamw/foreach": (adamw_for_loop, adamw_foreach),
    "adamw/fused": (adamw_for_loop, adamw_fused),
}


# --- applying to the model --------------------------------------------------

def _fused_ffn_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.w2(swiglu_packed(x, self.w1.weight, self.w3.weight))


def _fused_block_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same math as Block.forward with the middle residual add and ffn_norm in
    # one op. The block-final add and the next block's attention_norm straddle
    # Decoder.forward's loop, which stays untouched, so they are not fused.
    x, n = add_rmsnorm_function(x, self.attention(self.attention_norm(x), cos, sin),
                                self.ffn_norm.weight, self.ffn_norm.eps)
    return x + self.feed_forward(n)


def compile_blocks(model: nn.Module) -> int:
    """Compile each Block in place (``Module.compile`` keeps state_dict keys,
    unlike ``torch.compile(block)`` which adds ``_orig_mod.``). Returns count."""
    for block in model.layers:
        block.compile()
    return len(model.layers)


def apply_fusion(model: nn.Module, mode: FusionMode) -> dict:
    """Apply a fusion mode to a Decoder in place; returns notes of what was done.

    ``fused``: eager custom autograd Functions (packed SwiGLU GEMM, residual
    add + RMSNorm) swapped in as instance forwards; ``compile``: inductor on
    each unmodified Block. Both report the optimizer kwargs to use."""
    if mode not in ("none", "fused", "compile"):
        raise ValueError(f"unknown fusion mode {mode!r}; known: none, fused, compile")
    if getattr(model, "_fusion_mode", "none") != "none":
        raise ValueError(f"fusion {model._fusion_mode!r} is already applied to this model")
    notes: dict = {"mode": mode, "optimizer_kwargs": fused_optimizer_kwargs(mode)}
    if mode == "fused":
        packed = 0
        for block in model.layers:
            packed += pack_swiglu_weights(block.feed_forward)
            block.feed_forward.forward = types.MethodType(_fused_ffn_forward, block.feed_forward)
            block.forward = types.MethodType(_fused_block_forward, block)
        notes.update(swiglu="packed w1|w3 GEMM, autograd Function", swiglu_weights_packed=packed,
                     add_rmsnorm="autograd Function (mid-block residual + ffn_norm)",
                     blocks=len(model.layers))
    elif mode == "compile":
        notes.update(blocks_compiled=compile_blocks(model), backend="inductor")
    model._fusion_mode = mode
    return notes


def _grads(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from impl.model import lm_loss

    logits = model(tokens[:, :-1])
    loss = lm_loss(logits, tokens[:, 1:])
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    # autograd.grad, not backward(): leaves every .grad as the caller had it.
    grads = torch.autograd.grad(loss, params)
    return logits.detach(), dict(zip(names, grads)) | {"loss": loss.detach()}


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    diff = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    return diff / scale if scale > 0 else diff


def validate_fusion(model_fused: nn.Module, model_ref: nn.Module, sample_tokens: torch.Tensor) -> float:
    """Max relative error of logits, loss and every parameter gradient between
    a fused model and its unfused twin (same weights) on sample_tokens (B, T+1).
    Raises ValueError above TOLERANCE for the parameters' dtype."""
    ref_state, fused_state = model_ref.state_dict(), model_fused.state_dict()
    if ref_state.keys() != fused_state.keys():
        raise ValueError(f"state_dict keys differ: {sorted(ref_state.keys() ^ fused_state.keys())}")
    for k, v in ref_state.items():
        if not torch.equal(v, fused_state[k]):
            raise ValueError(f"fused and reference models start from different weights ({k})")
    dtype = next(model_ref.parameters()).dtype
    tol = TOLERANCE[dtype]
    ref_logits, ref_grads = _grads(model_ref, sample_tokens)
    logits, grads = _grads(model_fused, sample_tokens)
    errors = {"logits": max_rel_error(logits, ref_logits)}
    errors |= {k: max_rel_error(grads[k], v) for k, v in ref_grads.items()}
    worst = max(errors, key=errors.get)
    if errors[worst] > tol:
        raise ValueError(f"fused model differs from reference: {worst} max rel error "
                         f"{errors[worst]:.3g} > {tol:g} ({dtype})")
    return errors[worst]
