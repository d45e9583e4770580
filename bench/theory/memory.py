"""Memory: model-state bytes per rank (ZeRO, Rajbhandari et al. 2020 §5; Fig. 1), optimizer-state
bytes per optimizer, and activation bytes per layer (Korthikanti et al. 2022, Table 2).

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

from typing import Any


# Optimizer state bytes per parameter kept in fp32 (excluding a master copy).
# 1-bit LAMB also keeps a fresh variance and the previous momentum (Li et al. 2021, Alg. 1).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4, "lamb": 8, "lars": 4, "onebit_adam": 8, "onebit_lamb": 16}


PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


ADAM8BIT_BLOCK = 2048  # Dettmers et al. 2021: block-wise quantization, one fp32 absmax per block


ADAM8BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this


def optimizer_state_bytes(shapes: dict[str, tuple[int, ...]], optimizer: str, *, dp: int = 1) -> float:
    """Bytes of optimizer state for parameters of the given shapes (unsharded,
    fp32 state, no master copy; per-tensor step counters not counted).

    Adam/LAMB 8 B/param (two moments), SGD/LARS 4 (momentum); Adafactor keeps a
    factored second moment, n+m floats per n×m matrix (Shazeer & Stern 2018)
    and n per vector; 8-bit Adam 2 B/param plus two fp32 absmax per 2048-value
    block, 8 B/param for tensors under 4096 values (Dettmers et al. 2021);
    1-bit Adam/LAMB add the error-feedback buffers of the compressed
    all-reduce: a worker error of Ψ and a server error of Ψ/N values (Tang et al. 2021)."""
    total = 0.0
    psi = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        psi += n
        if optimizer == "adafactor":
            total += 4 * (shape[0] + shape[1]) if len(shape) == 2 else 4 * n
        elif optimizer == "adam8bit":
            total += 2 * n + 2 * 4 * -(-n // ADAM8BIT_BLOCK) if n >= ADAM8BIT_MIN_SIZE else 8 * n
        elif optimizer in OPTIMIZER_STATE_BYTES:
            total += OPTIMIZER_STATE_BYTES[optimizer] * n
        else:
            raise ValueError(f"no state-size formula for optimizer {optimizer!r}")
    if optimizer.startswith("onebit"):
        total += 4 * psi * (1 + 1 / dp)
    return total


def model_state_bytes(psi: float, *, zero: int, dp: int, precision: str = "fp16", optimizer: str = "adamw",
                      offload: bool = False, optimizer_bytes: float | None = None) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and optimizer state under ZeRO
    (Rajbhandari et al. 2020, §5 and Fig. 1). Mixed precision keeps 16-bit
    params and grads plus an fp32 master copy inside K (Adam: K = 12);
    fp32 training keeps params 4Ψ, grads 4Ψ, Adam 8Ψ. With optimizer offload an
    fp32 run also keeps a host master copy of its shard (+4Ψ/N), since a CPU
    optimizer cannot update device parameters in place. ``optimizer_bytes``
    (from ``optimizer_state_bytes``) replaces K·Ψ for optimizers whose state is
    not a fixed number of bytes per parameter."""
    if optimizer_bytes is None and optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"no state-size formula for optimizer {optimizer!r}")
    w = PRECISION_BYTES[precision]
    master = 4 if precision != "fp32" or offload else 0
    if optimizer_bytes is None:
        optimizer_bytes = OPTIMIZER_STATE_BYTES[optimizer] * psi
    params, grads, opt = w * psi, w * psi, optimizer_bytes + master * psi
    if zero >= 1:
        opt /= dp
    if zero >= 2:
        grads /= dp
    if zero >= 3:
        params /= dp
    return {"params": params, "grads": grads, "optimizer": opt}


def activation_bytes_per_layer(*, s: int, b: int, h: int, a: int, tp: int = 1, sequence_parallel: bool = False,
                               recompute: str = "none", bytes_per_value: int = 2) -> float:
    """Korthikanti et al. 2022, eq. 1–6 (16-bit values; scaled for other widths):
    s·b·h·(34 + 5·a·s/h); with TP t: s·b·h·(10 + 24/t + 5·a·s/(h·t)); with TP and
    sequence parallel: s·b·h/t·(34 + 5·a·s/h); selective recompute drops the
    5·a·s/h term; full recompute keeps the 2·s·b·h layer input."""
    scale = bytes_per_value / 2
    if recompute == "full":
        return 2 * s * b * h * scale
    attn = 0 if recompute == "selective" else 5 * a * s / h
    if tp == 1:
        per = s * b * h * (34 + attn)
    elif sequence_parallel:
        per = s * b * h / tp * (34 + attn)
    else:
        per = s * b * h * (10 + 24 / tp + attn / tp)
    return per * scale


def activation_values_per_layer(cfg: Any, s: int, b: int, recompute: str = "none", *,
                                attention_core: str = "fused") -> int:
    """Values (elements) one ``impl.model.Block`` keeps for backward, fp32 training.

    h = dim, f = ffn_dim, a = n_heads, sbh = s·b·h.
    Walking ``Block.forward`` (the saved tensors of each op; autograd saves an
    operand only when the *other* operand needs its gradient):

    * RMSNorm ×2: its input x (pow and mul save it), x·rsqrt (saved by ·weight),
      and rsqrt (s·b)                                      → 2·(2·sbh + s·b)
    * wq/wk/wv save the normed input; wo saves the re-laid-out core output
                                                           → 2·sbh
    * RoPE saves nothing of size sbh: x1·cos needs only cos (a buffer) for
      x1's gradient                                        → 0
    * FFN (SwiGLU): w1 and w3 share the normed input (sbh); silu saves w1x;
      the product saves silu(w1x) and w3x; w2 saves the product
                                                           → sbh + 4·s·b·f
    * core inputs q, k, v after RoPE and the GQA repeat (full n_heads width
      whatever n_kv_heads is; the narrower pre-repeat k, v are not kept)
                                                           → 3·sbh
    * core internals: ``fused`` (``F.scaled_dot_product_attention``, which on CPU
      runs the flash kernel) saves its output and the log-sum-exp:
      sbh + a·s·b; ``eager`` (softmax(q·kᵀ/√d + mask)·v) saves the probabilities
      a·s²·b — Korthikanti et al. 2022's 5·a·s/h term, here 1·a·s²·b in fp32.

    Total (fused): 11·sbh + 4·s·b·f + 2·s·b + a·s·b (tiny: f = 3h → ≈ 23·sbh).
    This is the fp32 analogue of Korthikanti's 34·sbh for GPT (4h GeLU MLP,
    dropout masks, 16-bit values counted as 2 bytes each); SwiGLU's extra
    branch and RMSNorm's fp32 x·rsqrt make the difference.

    ``recompute``: ``"full"`` keeps only the block input (sbh; Chen et al. 2016);
    ``"selective"`` checkpoints the attention core (Korthikanti §4.2), which
    keeps its inputs q, k, v and drops only the core internals — with a fused
    (flash) core that is sbh + a·s·b, not an s² term, because the flash kernel
    stores no s² tensor in the first place.
    """
    if recompute not in ("none", "full", "selective"):
        raise ValueError(f"recompute must be none, full or selective, not {recompute!r}")
    if attention_core not in ("fused", "eager"):
        raise ValueError(f"attention_core must be fused or eager, not {attention_core!r}")
    h, f, a = cfg.dim, cfg.ffn_dim, cfg.n_heads
    sbh, sb = s * b * h, s * b
    if recompute == "full":
        return sbh
    outside_core = 2 * (2 * sbh + sb) + 2 * sbh + sbh + 4 * s * b * f  # norms, linear inputs, SwiGLU
    core_inputs = 3 * sbh
    core_internal = sbh + a * s * b if attention_core == "fused" else a * s * s * b
    if recompute == "selective":
        core_internal = 0
    return int(outside_core + core_inputs + core_internal)


def logits_transient_bytes(*, b: int, s: int, vocab: int, tp: int = 1) -> float:
    """The loss's transient beside the activations: ``impl.model.lm_loss`` casts the
    (b, s, V) logits to fp32 for the cross-entropy, and backward makes their fp32
    gradient of the same shape; 2·b·s·V·4 bytes while both live (a vocab-parallel
    loss holds V/tp per rank). Not in Korthikanti et al.'s per-layer count, which
    covers the transformer layers only: a named extra term."""
    return 2 * b * s * (vocab / tp) * 4
