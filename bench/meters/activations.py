"""Activation memory: what autograd keeps for backward, measured and predicted.

``saved_activation_bytes(fn)`` runs ``fn`` (a forward pass) under
``torch.autograd.graph.saved_tensors_hooks``. Every tensor an op saves for
backward passes through the pack hook; the meter keeps a weak reference per
tensor and counts each *storage* once (a view of ``q`` saved by RoPE and the
``q`` saved by attention are one buffer), leaving out storages of tensors the
caller names as non-activations (parameters, buffers such as the RoPE tables).

Non-reentrant ``torch.utils.checkpoint`` saves its region's inputs through the
same hooks (``_CheckpointFrame.save_inputs``) before it installs its own hooks
for the region, so a checkpointed block shows up as exactly what it keeps: its
inputs. Tensors recomputed in backward are not seen (they live only during
backward); the CPU peak tracker (``bench.meters.memory``) covers that.

``activation_values_per_layer`` is the prediction for one ``impl.model.Block``.
It is pure Python (no torch) so it can move verbatim into ``bench/theory.py``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch


@dataclass(frozen=True, slots=True)
class SavedActivations:
    saved_bytes: int
    """Distinct storages held for backward when ``fn`` returned."""
    peak_saved_bytes: int
    """Maximum over the forward of the distinct saved storages alive at once
    (equals ``saved_bytes`` unless part of the graph was dropped during ``fn``)."""
    n_storages: int
    """Distinct storages behind ``saved_bytes``."""
    output: Any
    """What ``fn`` returned (keeps the graph alive; call backward on it if wanted)."""


def saved_activation_bytes(fn: Callable[[], Any], *, exclude: Iterable[torch.Tensor] = ()) -> SavedActivations:
    """Bytes autograd holds for backward at the end of ``fn()``, deduplicated by storage.

    ``exclude``: tensors whose storages are not activations (pass
    ``[*model.parameters(), *model.buffers()]``); a saved view of a weight
    (``linear`` saves ``W``) is then not counted."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    refs: dict[int, int] = {}  # storage ptr -> live saved tensors referring to it
    sizes: dict[int, int] = {}
    live = peak = 0

    def release(key: int) -> None:
        nonlocal live
        refs[key] -= 1
        if refs[key] == 0:  # the storage can be freed: no saved tensor refers to it
            live -= sizes.pop(key)
            del refs[key]

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal live, peak
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in excluded or t.device.type == "meta" or storage.nbytes() == 0:
            return t
        if key not in refs:
            refs[key], sizes[key] = 0, storage.nbytes()
            live += storage.nbytes()
            peak = max(peak, live)
        refs[key] += 1
        weakref.finalize(t, release, key)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return SavedActivations(saved_bytes=live, peak_saved_bytes=peak, n_storages=len(refs), output=out)


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
