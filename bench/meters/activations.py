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

from bench.theory import activation_values_per_layer  # noqa: F401  (the prediction lives with the theory)


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


