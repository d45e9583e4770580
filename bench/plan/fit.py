"""Pre-launch memory fit: cells whose predicted per-device bytes exceed the
device are recorded as ``unsupported`` without launching (and ``bench
validate`` shows the prediction for every cell).

Predicted bytes per device = model state (``theory.predict``'s ZeRO/TP
formulas; for layouts it has no formula for, Ψ ÷ (tp·pp) under the same
ZeRO formula) less what offload keeps on the host, plus activations of one
micro-batch over all L layers (Korthikanti et al. 2022, s·b·h·34 per layer in
16-bit, ÷ t with sequence parallel; a 1F1B stage holds p micro-batches of L/p
layers, the same total) without the 5·a·s/h attention-score term, which a
flash/SDPA kernel never stores; plus the loss's transient, the fp32 logits of
one micro-batch and their gradient (2·b·s·V·4 bytes, V/tp with a vocab-parallel
loss; ``theory.logits_transient_bytes``), a named term outside the per-layer
count. Framework buffers and the allocator's fragmentation are not counted, so
the figure is a lower bound: a cell over it cannot fit; a cell under it may still OOM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.theory import (PRECISION_BYTES, activation_bytes_per_layer, logits_transient_bytes, model_state_bytes,
                          optimizer_state_bytes, predict)

GIB = 2**30


@dataclass(frozen=True, slots=True)
class Prediction:
    state_bytes: float
    activation_bytes: float
    source: str
    logits_bytes: float = 0.0
    """The loss's transient: fp32 logits of one micro-batch and their gradient."""
    state_parts: dict[str, float] = field(default_factory=dict)
    """The model state on the device by kind: params, grads, optimizer (bytes)."""

    @property
    def total_bytes(self) -> float:
        return self.state_bytes + self.activation_bytes + self.logits_bytes


def predict_device_bytes(knobs: Any, theory: dict[str, Any] | None = None) -> Prediction | None:
    """Lower-bound bytes one device holds for a training cell; None for workloads without a model."""
    if knobs.workload != "train":
        return None
    from impl.model_config import PRESETS, param_shapes

    cfg = PRESETS[knobs.model]
    theory = theory or predict(knobs)
    state = theory.get("model_state_bytes")
    source = "theory model state"
    if state is None:
        shapes = param_shapes(cfg)
        split = knobs.tp * knobs.pp
        try:
            opt = optimizer_state_bytes(shapes, knobs.optimizer, dp=knobs.dp) / split
        except ValueError:
            return None
        state = model_state_bytes(theory["params"] / split, zero=knobs.zero, dp=knobs.dp, precision=knobs.precision,
                                  optimizer=knobs.optimizer, offload=knobs.offload != "none", optimizer_bytes=opt)
        source = "Ψ/(tp·pp) model state"
    on_device = dict(state)
    if knobs.offload != "none":
        on_device["optimizer"] = 0.0
    if knobs.offload == "optimizer+params":
        on_device["params"] = 0.0
    micro_b = max(1, knobs.batch_size // (knobs.dp * knobs.microbatches))
    act = cfg.n_layers * activation_bytes_per_layer(
        s=knobs.seq_len // knobs.cp, b=micro_b, h=cfg.dim, a=cfg.n_heads, tp=knobs.tp,
        sequence_parallel=knobs.sequence_parallel == "megatron",
        recompute="selective" if knobs.checkpointing == "none" else knobs.checkpointing,
        bytes_per_value=PRECISION_BYTES[knobs.precision])
    # The last pipeline stage computes the loss; tp shards the vocabulary (Megatron's vocab-parallel loss).
    logits = logits_transient_bytes(b=micro_b, s=knobs.seq_len // knobs.cp, vocab=cfg.vocab_size, tp=knobs.tp)
    return Prediction(sum(on_device.values()), act, source, logits_bytes=logits, state_parts=on_device)


def available_bytes(run: Any, device: str) -> float | None:
    """Per-device memory: the run setting ``device_memory_gib``; else, for cuda,
    the visible device's total; else None (no check)."""
    if run.device_memory_gib is not None:
        return run.device_memory_gib * GIB
    if device != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(0).total_memory)


def fit_reason(knobs: Any, available: float | None, theory: dict[str, Any] | None = None) -> str | None:
    """Why a cell cannot fit, or None."""
    if available is None:
        return None
    pred = predict_device_bytes(knobs, theory)
    if pred is None or pred.total_bytes <= available:
        return None
    return (f"predicted {pred.total_bytes / GIB:.2f} GiB > {available / GIB:.2f} GiB available per device "
            f"(model state {pred.state_bytes / GIB:.2f} + activations {pred.activation_bytes / GIB:.2f} + logits "
            f"{pred.logits_bytes / GIB:.2f} GiB; "
            "lower bound, bench.plan.fit)")


def describe(knobs: Any, available: float | None) -> str:
    """One line for ``bench validate``."""
    pred = predict_device_bytes(knobs)
    if pred is None:
        return "memory: no prediction"
    avail = f" of {_size(available)}" if available is not None else ""
    verdict = "" if available is None else (" — fits" if pred.total_bytes <= available else " — DOES NOT FIT")
    return (f"memory: predicted {_size(pred.total_bytes)}{avail} per device (state {_size(pred.state_bytes)}"
            f" + activations {_size(pred.activation_bytes)} + logits {_size(pred.logits_bytes)}){verdict}")


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"
