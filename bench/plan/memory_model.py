"""Peak memory per device of one configuration: the memory half of ``bench.plan.cost_model``.

Memory per device (``memory``): the larger of the end of forward — model state from
``bench.plan.fit`` less the gradients not made yet, this decoder's activations
(``theory.activation_values_per_layer``; per TP rank ``tp_activation_values``)
for the micro-batches a stage holds at once (1F1B stage r: min(m, p−r), GPipe: m),
the final norm + head input, and the loss working set (logits, their
log-softmax and its gradient: 3·b·s·V/t fp32 values, last stage) — and the
optimizer step (full state + its largest temporary); DDP's flat bucket copies
when gradients persist across micro-batches; a ZeRO-2/3 backward walked unit by
unit (``zero_backward_peak``).
"""
from __future__ import annotations

import math
from typing import Any

from bench.theory import PRECISION_BYTES, activation_values_per_layer, tp_local_params

LOSS_COPIES = 3
"""Logits, the log-softmax cross-entropy saves, and its gradient, alive together at the start of backward."""
ZERO_RS_IN_FLIGHT = 2
"""``impl.zero.MAX_INFLIGHT_RS``: reduce-scatters in flight in a ZeRO-2/3 backward (kept equal by a test)."""


def tp_activation_values(cfg: Any, s: int, b: int, tp: int, *, sequence_parallel: bool = False,
                         recompute: str = "none") -> float:
    """Values one ``impl.model.Block`` keeps per TP rank. Of
    ``theory.activation_values_per_layer``'s 11·sbh + 4·sbf + 2·sb + a·sb, the two
    RMSNorms (x, x·rsqrt, rsqrt: 2·(2·sbh + sb)) and the normed inputs of wq/wk/wv
    and w1/w3 (2·sbh) are replicated on every TP rank (÷ t only with sequence
    parallel); the rest (q, k, v, the core output and log-sum-exp, wo's input,
    the SwiGLU branch) is split by heads or ffn columns. For ``small`` at t = 2
    that keeps 0.630 of the values — measured exactly on the in-house TP block —
    where Korthikanti et al.'s GPT ratio (10 + 24/t + 5as/(ht))/(34 + 5as/h) gives
    0.593. Full recompute keeps only the (replicated) block input."""
    total = activation_values_per_layer(cfg, s, b, recompute)
    if tp == 1:
        return total
    replicated = s * b * cfg.dim if recompute == "full" else 6 * s * b * cfg.dim + 2 * s * b
    return (replicated / tp if sequence_parallel else replicated) + (total - replicated) / tp


def head_activation_values(cfg: Any, s: int, b: int) -> float:
    """Final RMSNorm (x, x·rsqrt, rsqrt) and the head's input, last stage: 3·sbh + sb (measured)."""
    return 3 * s * b * cfg.dim + s * b


def zero_unit_numels(cfg: Any) -> list[float]:
    """``impl.zero.decoder_units`` in backward order: norm + head, blocks L−1 … 0, embedding."""
    from impl.model_config import total_params

    embedding = cfg.vocab_size * cfg.dim
    block = (total_params(cfg) - 2 * embedding - cfg.dim) / cfg.n_layers
    return [embedding + cfg.dim] + [block] * cfg.n_layers + [embedding]


def zero_backward_peak(knobs: Any, cfg: Any, parts: dict[str, float],
                       block_act_bytes: float) -> tuple[float, float, float]:
    """(state, activations, working set) bytes at the fullest moment of a ZeRO-2/3 backward,
    walking ``impl.zero``'s units as they become ready. When unit k's last
    gradient is accumulated, ``_on_unit_ready`` launches its reduce-scatter while
    its unsharded ``.grad``s are still alive: the padded flat copy, gloo's copy of
    that input (``ProcessGroupGloo`` clones a reduce-scatter's input; NCCL does
    not) and the output shard; ``ZERO_RS_IN_FLIGHT − 1`` earlier units are still
    in flight with their flat copies, backend copies and output shards; stage 3
    also holds unit k's gathered parameters and the next unit's prefetch. The
    activations of the blocks not yet back-propagated are alive; the gradient
    shards of finished units are (under accumulation, all of them are, from the
    earlier micro-batches, and each in-flight output shard is one more).

    Measured on ``small``, 2 CPU ranks, ZeRO-3, 4 micro-batches: the peak is at the
    reduce-scatter of the last block, 79.6 MiB against 78.6 MiB here; the model
    state plus activations (the formula before this walk) is 59.9 MiB. With one
    micro-batch the loss's working set dominates instead."""
    elem = PRECISION_BYTES[knobs.precision]
    n, m, L = knobs.dp, knobs.microbatches, cfg.n_layers
    units = [u * elem for u in zero_unit_numels(cfg)]
    backend_copy = 1 if knobs.device == "cpu" else 0
    base = parts.get("params", 0.0) + parts.get("optimizer", 0.0)
    best = (0.0, 0.0, 0.0)
    for k, u in enumerate(units):
        in_flight = units[max(0, k - (ZERO_RS_IN_FLIGHT - 1)):k]
        finished = units[:max(0, k - (ZERO_RS_IN_FLIGHT - 1))]
        grads = parts.get("grads", 0.0) if m > 1 else sum(finished) / n
        blocks_left = L if k == 0 else max(0, L - k)
        work = (2 + backend_copy) * u + u / n + sum((1 + backend_copy) * w + w / n for w in in_flight)
        if knobs.zero == 3:
            work += u + (units[k + 1] if k + 1 < len(units) else 0.0)
        live = (base + grads, blocks_left * block_act_bytes, work)
        if sum(live) > sum(best):
            best = live
    return best


def memory(knobs: Any, cfg: Any) -> tuple[float, float, float, float]:
    """(state, activations, loss working set, transient) bytes at the peak of the fullest device.

    The peak is the larger of two moments. End of forward (the loss of the last
    micro-batch a stage holds): parameters + optimizer state + the gradients
    accumulated from earlier micro-batches (none with one micro-batch: ``zero_grad``
    set them to None) + activations + the loss working set. The optimizer step:
    full model state + its largest temporary. A ZeRO-2/3 backward adds its
    communication working set (``zero_backward_peak``). DDP (dp > 1, ZeRO 0) and
    ZeRO-1 keep the full state at the forward peak: their gradient buckets
    (``impl.data_parallel``, ZeRO-1's flat gradients) are as large and persist."""
    from bench.plan.fit import predict_device_bytes

    pred = predict_device_bytes(knobs)
    parts = pred.state_parts
    elem = PRECISION_BYTES[knobs.precision]
    tp, pp, m = knobs.tp, knobs.pp, knobs.microbatches
    b = knobs.batch_size // (knobs.dp * m)
    s = knobs.seq_len
    sp = knobs.sequence_parallel == "megatron"
    per_layer = tp_activation_values(cfg, s, b, tp, sequence_parallel=sp, recompute=knobs.checkpointing) * elem
    head = head_activation_values(cfg, s, b) * elem
    # the fullest stage: 1F1B stage r holds min(m, p−r) micro-batches, GPipe m; the loss sits on the last
    layers = math.ceil(cfg.n_layers / pp)
    loss = LOSS_COPIES * b * s * cfg.vocab_size / tp * 4  # the loss is computed in fp32
    held = [1] if pp == 1 else [m if knobs.pp_schedule == "gpipe" else min(m, pp - r) for r in range(pp)]
    grads_persist = knobs.zero == 1 or (knobs.zero == 0 and knobs.dp > 1)
    no_grads = pred.state_bytes - parts.get("grads", 0.0)
    # per stage: (state, activations, loss) at its forward peak; gradients exist once a micro-batch finished backward
    stages = [(pred.state_bytes if grads_persist or m > h else no_grads,
               (per_layer * layers + (head if r == pp - 1 else 0.0)) * h, loss if r == pp - 1 else 0.0)
              for r, h in enumerate(held)]
    state, act, loss = max(stages, key=sum)
    transient = 0.0
    if knobs.zero == 0 and knobs.offload == "none":
        # the optimizer step's largest temporary: one value per parameter of the largest tensor
        biggest = max(cfg.vocab_size * cfg.dim // tp, 3 * cfg.dim * cfg.ffn_dim // tp) * elem
        if knobs.dp > 1:
            transient = biggest
            if m > 1:
                # DDP's flat bucket copies (impl.data_parallel) coexist with gradients
                # kept across micro-batches; with m = 1 they replace gradients not yet made
                transient += tp_local_params(cfg, tp) / pp * elem
        elif pred.state_bytes + biggest > state + act + loss:
            state, act, loss, transient = pred.state_bytes, 0.0, 0.0, biggest  # the optimizer step is the peak
    if knobs.zero >= 2:
        walk = zero_backward_peak(knobs, cfg, parts, per_layer)
        if sum(walk) > state + act + loss:
            (state, act, transient), loss = walk, 0.0
    return state, act, loss, transient
