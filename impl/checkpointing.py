"""Activation checkpointing (recomputation), applied to a built decoder from outside.

Memory per transformer layer that autograd keeps for backward (see
``bench.meters.activations.activation_values_per_layer`` for this model's
count, fp32 values, fused attention core):

* none:      11·sbh + 4·s·b·f + a·s·b + 2·s·b
* full:      sbh — only the block input; everything else is recomputed by
             re-running the block's forward during backward (Chen et al. 2016,
             "Training Deep Nets with Sublinear Memory Cost"). Cost: one extra
             forward of each checkpointed block (≈ +33 % FLOPs).
* selective: the attention core's internals only are recomputed
             (Korthikanti et al. 2022, "Reducing Activation Recomputation in
             Large Transformer Models", §4.2: the softmax/score tensors, 5·a·s/h
             of their 34 + 5·a·s/h, cheap to recompute but O(s²) to store).
             With an eager core that is the a·s²·b probability tensor; with the
             model's default fused (flash) core there is no s² tensor to drop,
             only its output and log-sum-exp (sbh + a·s·b).

Both modes use non-reentrant ``torch.utils.checkpoint`` (``use_reentrant=False``):
it works with inputs that do not require grad, with keyword arguments, and
saves the region's inputs through the ordinary saved-tensor hooks, so the
activation meter sees them.

Full mode swaps the block's ``forward`` on the instance rather than wrapping
the block in another module, so parameter names and ``state_dict`` keys do
not change (torch's ``checkpoint_wrapper`` adds a ``_checkpoint_wrapped_module.``
prefix that checkpoints and other plans would have to strip).

Order of composition: apply after anything that replaces ``attention.core``
(sparse attention) and before compile / FSDP, as torchtitan does
(checkpointing → compile → FSDP), so the recomputed region is the final one.
"""
from __future__ import annotations

import functools
from typing import Callable, Literal

from torch import nn
from torch.utils.checkpoint import checkpoint

# Marks a block or core this module has wrapped, so a second call fails loudly
# instead of nesting checkpoints (which would recompute twice).
_WRAPPED = "_trainbench_checkpointed"


def checkpointed(fn: Callable) -> Callable:
    """``fn`` whose internals are recomputed in backward; only its inputs are kept."""
    wrapped = functools.partial(checkpoint, fn, use_reentrant=False)
    setattr(wrapped, _WRAPPED, True)
    return wrapped


def is_checkpointed(obj: object) -> bool:
    """True for a block (full mode) or an attention core (selective mode) wrapped here."""
    return bool(getattr(obj, _WRAPPED, False)) or bool(getattr(getattr(obj, "forward", None), _WRAPPED, False))


def apply_activation_checkpointing(model: nn.Module, mode: Literal["full", "selective"], every: int = 1) -> int:
    """Checkpoint every ``every``-th block of ``model.layers`` (the 1st, 2nd, … with
    ``every=1``; the 2nd, 4th, … with ``every=2``, as torchtitan's ``ac_freq``).

    ``full``: the whole block is recomputed; ``selective``: only
    ``block.attention.core``. Returns the number of blocks wrapped."""
    if mode not in ("full", "selective"):
        raise ValueError(f"mode must be 'full' or 'selective', not {mode!r}")
    if every < 1:
        raise ValueError(f"every must be >= 1, not {every}")
    wrapped = 0
    for i, block in enumerate(model.layers):
        if (i + 1) % every:
            continue
        if is_checkpointed(block) or is_checkpointed(block.attention.core):
            raise ValueError(f"layers.{i} is already checkpointed; checkpointing twice recomputes twice")
        if mode == "full":
            # An instance attribute shadows Block.forward; nn.Module.__call__ (and its
            # hooks) still run around it, and the module tree is untouched.
            block.forward = checkpointed(block.forward)
        else:
            block.attention.core = checkpointed(block.attention.core)
        wrapped += 1
    return wrapped
