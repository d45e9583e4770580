"""Analytical step time and memory of one configuration on a calibrated machine.

Step time per rank:

* compute, per micro-batch and piece (block, embedding, norm + head + loss):
  measured when the profile holds a layer profile of this model at this shape
  (``layer_profile``: the pieces timed on this machine in as many concurrent
  ranks, TP-local shapes, as Galvatron profiles layers); otherwise the matmul
  FLOPs (forward 2·rows·in·out per linear, backward twice that; the attention
  core 4·b·s²·H·d_head/t forward, PaLM App. B) ÷ the probe's throughput *at
  that matmul's shape*, plus the block's saved activations streamed
  ``ELEMENTWISE_PASSES`` times and ``OPS_PER_LAYER`` op overheads. Full
  recompute adds one block forward, selective the core's (Chen et al. 2016;
  Korthikanti et al. 2022 §5);
* pipeline: blocks cut into stages as ``impl.pipeline.partition_layers`` cuts
  them for the cell; Σ t_r + (m − 1)·max t_r over the ranks' stage times
  (balanced: bubble (p−1)/m of ideal, Narayanan et al. 2021 §2.2; interleaved ÷ v);
* communication: per collective kind, t = calls·α + bus_bytes/β with the
  profile's α–β for that kind and group size; volumes from ``bench.theory``
  (DP/ZeRO 2Ψ or 3Ψ(N−1)/N, TP (4L+2)·b·s·h all-reduces, pipeline p2p);
  DP/ZeRO traffic hides behind the backward as far as the machine overlaps
  (``MachineProfile.overlap``, measured) — or, for ZeRO-2/3 when the layer
  profile holds ``impl.zero`` timed in place at this shape, what that probe
  measured, scaled to the model (``zero_in_place``); TP and p2p do not hide; each blocking
  TP collective also waits for the later rank (``tp_call_extra``: the layer
  profile's in-place all-reduce less its α–β);
* optimizer: the shard × the step's measured seconds per parameter for that
  optimizer and layout (ZeRO's flat buffers or the model's tensors), else its
  state streamed once (Adam fp32: 28 B/param) ÷ bandwidth; offload adds the
  gradient shard down and the parameter shard up over the host link.

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
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.theory import (PRECISION_BYTES, activation_values_per_layer, dp_comm_elements,
                          tp_comm_bytes, tp_local_params)
from bench.plan.machine import MachineProfile

ELEMENTWISE_PASSES = 4
"""Each saved activation is written in forward, read in backward, and its gradient written and read."""
OPS_PER_LAYER = 50
"""Autograd ops in one ``impl.model.Block`` forward (norms 2×6, 7 linears, RoPE 2×9, views, SDPA, SwiGLU, residuals)."""
LOSS_COPIES = 3
"""Logits, the log-softmax cross-entropy saves, and its gradient, alive together at the start of backward."""
ADAM_STREAM_BYTES = 28
DDP_BUCKET_BYTES = 25 * 2**20
ZERO_RS_IN_FLIGHT = 2
"""``impl.zero.MAX_INFLIGHT_RS``: reduce-scatters in flight in a ZeRO-2/3 backward (kept equal by a test)."""


@dataclass(slots=True)
class Estimate:
    step_time_s: float
    compute_s: float
    memory_bound_s: float
    bubble_s: float
    comm_s: dict[str, float]
    """Seconds per "axis kind" (dp all_reduce, tp all_reduce, pp p2p, …), before overlap."""
    exposed_comm_s: float
    optimizer_s: float
    state_bytes: float
    activation_bytes: float
    loss_bytes: float
    transient_bytes: float
    comm_bus_bytes: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def memory_bytes(self) -> float:
        return self.state_bytes + self.activation_bytes + self.loss_bytes + self.transient_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memory_bytes": self.memory_bytes}


def _layer_matmuls(cfg: Any, tp: int) -> list[tuple[int, int]]:
    """(in, out) of each linear of one block on one TP rank (column-parallel splits out, row-parallel in)."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    return [(d, cfg.n_heads * hd // tp), (d, cfg.n_kv_heads * hd // tp), (d, cfg.n_kv_heads * hd // tp),
            (cfg.n_heads * hd // tp, d), (d, f // tp), (d, f // tp), (f // tp, d)]


def _forward_matmul_s(profile: MachineProfile, ranks: int, rows: int, pairs: list[tuple[int, int]]) -> float:
    return sum(2 * rows * i * o / profile.throughput(ranks, rows, math.sqrt(i * o)) for i, o in pairs)


def piece_times(knobs: Any, cfg: Any, profile: MachineProfile) -> tuple[float, float, float, float, str]:
    """Seconds of one micro-batch's pieces on one rank, forward + backward (+ recompute):
    (one block, the embedding, final norm + head + loss, the memory-bound share
    of a block, source). From the layer profile when it holds this shape
    (``layer_profile``: the pieces timed on this machine), else analytic: the
    matmul FLOPs ÷ the probe's throughput at that matmul's shape, the saved
    activations streamed ``ELEMENTWISE_PASSES`` times and ``OPS_PER_LAYER`` op
    overheads; full recompute adds one forward, selective the core's."""
    tp, m = knobs.tp, knobs.microbatches
    b = knobs.batch_size // (knobs.dp * m)
    s, ranks = knobs.seq_len, knobs.world_size  # ranks sharing the machine (GPU: ignored)
    measured = profile.layer(knobs.model, s, ranks, tp, b)
    if measured is not None:
        redo = {"none": 0.0, "full": measured["block_fwd_s"], "selective": measured["core_fwd_s"]}[knobs.checkpointing]
        block = measured["block_fwd_s"] + measured["block_bwd_s"] + redo
        return block, measured["embed_s"], measured["head_s"], 0.0, "layer profile"
    rows = b * s
    layer_fwd = _forward_matmul_s(profile, ranks, rows, _layer_matmuls(cfg, tp))
    heads = cfg.n_heads // tp
    core_fwd = 4 * b * s * s * heads * cfg.head_dim / profile.throughput(ranks, s, cfg.head_dim)
    head_fwd = _forward_matmul_s(profile, ranks, rows, [(cfg.dim, cfg.vocab_size // tp)])
    recompute = {"none": 0.0, "full": layer_fwd + core_fwd, "selective": core_fwd}[knobs.checkpointing]
    values = activation_values_per_layer(cfg, s, b, "none") / tp
    redo = {"none": 0.0, "full": 1.0, "selective": 0.1}[knobs.checkpointing]
    mem_bound = (ELEMENTWISE_PASSES + redo) * values * 4 / profile.mem_bandwidth_bytes_per_s
    mem_bound += OPS_PER_LAYER * (1 + (knobs.checkpointing == "full")) * profile.op_overhead_s
    return 3 * (layer_fwd + core_fwd) + recompute + mem_bound, 0.0, 3 * head_fwd, mem_bound, "FLOPs ÷ matmul probe"


def stage_times(knobs: Any, cfg: Any, profile: MachineProfile) -> tuple[list[float], float, str]:
    """Per pipeline rank, seconds of one micro-batch through its stages (forward +
    backward); the memory-bound share of the busiest; the compute source. Blocks
    are cut as ``impl.pipeline.partition_layers`` cuts them for the cell
    (``pp_balance``: parameter counts, or these piece times), stage 0 holding the
    embedding and the last stage the head and loss — a head that costs more
    than its parameter share makes the last stage the busiest."""
    block, embed, head, mem_bound, source = piece_times(knobs, cfg, profile)
    pp = knobs.pp
    if pp == 1:
        return [cfg.n_layers * block + embed + head], cfg.n_layers * mem_bound, source
    from impl.model_config import total_params
    from impl.pipeline import partition_layers

    v = knobs.virtual_stages if knobs.pp_schedule == "interleaved" else 1
    if knobs.pp_balance == "time":
        costs, first, last = [block] * cfg.n_layers, embed, head
    else:
        embedding = cfg.vocab_size * cfg.dim
        per_block = (total_params(cfg) - 2 * embedding - cfg.dim) / cfg.n_layers
        costs, first, last = [per_block] * cfg.n_layers, embedding, embedding + cfg.dim
    chunks = partition_layers(costs, pp * v, first_extra=first, last_extra=last)
    per_rank = [0.0] * pp
    blocks_on = [0] * pp
    for c, blocks in enumerate(chunks):  # loop placement: chunk c on pipeline rank c mod p
        r = c % pp
        per_rank[r] += len(blocks) * block + (embed if c == 0 else 0.0) + (head if c == len(chunks) - 1 else 0.0)
        blocks_on[r] += len(blocks)
    busiest = max(range(pp), key=per_rank.__getitem__)
    return per_rank, blocks_on[busiest] * mem_bound, source


def tp_call_extra(knobs: Any, cfg: Any, profile: MachineProfile) -> float:
    """Seconds a blocking TP collective costs beyond its α–β time: from the layer
    profile's in-place all-reduce of this shape (``layer_profile.time_tp_call``)
    less the α–β of that message, else the calibration's generic probe
    (``calibrate.blocking_extra``)."""
    b = knobs.batch_size // (knobs.dp * knobs.microbatches)
    measured = profile.layer(knobs.model, knobs.seq_len, knobs.world_size, knobs.tp, b) or {}
    if "tp_call_s" not in measured:
        return profile.blocking_extra(knobs.world_size)
    bus = b * knobs.seq_len * cfg.dim * PRECISION_BYTES[knobs.precision] * 2 * (knobs.tp - 1) / knobs.tp
    return max(0.0, measured["tp_call_s"] - profile.alpha_beta("all_reduce", knobs.tp).time_s(bus, 1))


def comm_times(knobs: Any, cfg: Any, profile: MachineProfile) -> tuple[dict[str, float], float]:
    """Seconds per collective kind on one rank per step, and the total bus bytes."""
    from impl.model_config import total_params

    elem = PRECISION_BYTES[knobs.precision]
    dp, tp, pp, m, L = knobs.dp, knobs.tp, knobs.pp, knobs.microbatches, cfg.n_layers
    out: dict[str, float] = {}
    bus_total = 0.0

    def add(kind: str, group: int, bus: float, calls: int, axis: str = "dp") -> None:
        nonlocal bus_total
        if group < 2 or calls == 0:
            return
        key = f"{axis} {kind}"
        # TP's blocking collectives between compute also wait for the later rank
        skew = calls * tp_skew if axis == "tp" else 0.0
        out[key] = out.get(key, 0.0) + profile.alpha_beta(kind, group).time_s(bus, calls) + skew
        bus_total += bus

    if dp > 1:
        psi = tp_local_params(cfg, tp) if tp > 1 else total_params(cfg) / pp
        total = dp_comm_elements(psi, zero=knobs.zero, dp=dp, microbatches=1 if pp > 1 else m) * elem
        half = psi * (dp - 1) / dp * elem  # one reduce-scatter or all-gather of every parameter
        units = L / pp + 2  # ZeRO units: embedding, each block, norm + head
        if knobs.zero == 0:
            add("all_reduce", dp, total, math.ceil(psi * elem / DDP_BUCKET_BYTES))
        elif knobs.zero == 1:
            add("reduce_scatter", dp, half, int(units))
            add("all_gather", dp, total - half, int(units))
        elif knobs.zero == 2:
            add("reduce_scatter", dp, total - half, int(units) * m)
            add("all_gather", dp, half, int(units))
        else:
            add("reduce_scatter", dp, total / 3, int(units) * m)
            add("all_gather", dp, 2 * total / 3, 2 * int(units) * m)
    if tp > 1:
        tp_skew = tp_call_extra(knobs, cfg, profile)
        sp = knobs.sequence_parallel == "megatron"
        act = tp_comm_bytes(cfg, b=knobs.batch_size // dp, s=knobs.seq_len, tp=tp, dp=1, sequence_parallel=sp,
                            bytes_per_value=elem)
        calls = (4 * L + 2 + 3) * m + (2 * L + 1 if sp else 0)
        if sp:  # each all-reduce becomes an all-gather + a reduce-scatter of half the bus bytes each
            add("all_gather", tp, act / 2, calls, "tp")
            add("reduce_scatter", tp, act / 2, calls, "tp")
        else:
            add("all_reduce", tp, act, calls, "tp")
    if pp > 1:
        per_msg = knobs.batch_size // (dp * m) * knobs.seq_len * cfg.dim * elem
        # an inner stage sends m activations forward and m gradients backward
        add("p2p", 2, 2 * m * per_msg, 2 * m, "pp")
    return out, bus_total


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


def exposed_dp_comm(knobs: Any, cfg: Any, comm: dict[str, float], per_micro_s: float, overlap: float) -> float:
    """Seconds of data-parallel communication left on the critical path.

    What can hide, and behind what (impl.data_parallel, impl.zero): DDP's bucket
    all-reduces and ZeRO-1's reduce-scatters are launched from gradient hooks in
    the backward of the last micro-batch only (accumulation reduces once);
    ZeRO-2/3 reduce-scatter (and ZeRO-3 re-gathers parameters) in every
    micro-batch's backward; ZeRO-3's forward all-gathers are prefetched behind
    the previous unit's forward. ZeRO-1/2's parameter all-gather after the
    optimizer step has nothing to overlap. Within a window (backward ≈ 2/3 of
    a micro-batch's compute, forward 1/3) the machine hides ``overlap`` of the
    traffic (measured; 1 on a GPU), and the last bucket or unit always shows.
    A pipeline all-reduces after its flush: nothing hides."""
    ar = comm.get("dp all_reduce", 0.0)
    rs = comm.get("dp reduce_scatter", 0.0)
    ag = comm.get("dp all_gather", 0.0)
    if not ar + rs + ag:
        return 0.0
    m = knobs.microbatches
    psi_local = tp_local_params(cfg, knobs.tp) / knobs.pp
    units = math.ceil(psi_local * PRECISION_BYTES[knobs.precision] / DDP_BUCKET_BYTES) if knobs.zero == 0 \
        else cfg.n_layers + 2
    backward, forward = 2 / 3 * per_micro_s, 1 / 3 * per_micro_s
    if knobs.pp > 1:
        overlap = 0.0

    def shown(t: float, window: float) -> float:
        return max(t - overlap * min(t, window), t / units) if t else 0.0

    if knobs.zero == 0:
        return shown(ar, backward)
    if knobs.zero == 1:
        return shown(rs, backward) + ag
    if knobs.zero == 2:
        return shown(rs, m * backward) + ag
    return shown(rs + ag / 2, m * backward) + shown(ag / 2, m * forward)


def zero_in_place(knobs: Any, cfg: Any, profile: MachineProfile) -> float | None:
    """Seconds per step that ZeRO-2/3's per-micro-batch traffic (stage 3: two
    all-gathers and a reduce-scatter per unit; stage 2: the reduce-scatter)
    leaves on the critical path, overlap and the cores it takes from compute
    included: the layer profile's in-place probe (``layer_profile.time_zero``,
    a one-block decoder) scaled to this model by the ratio of the two models'
    α–β traffic per micro-batch. None without a probe of this shape (pure data
    parallel only: the in-house adapter has no ZeRO with tp or pp)."""
    import dataclasses

    from bench.plan.layer_profile import ZERO_PROBE_LAYERS, zero_key, zero_probed

    if not zero_probed(knobs):
        return None

    b = knobs.batch_size // (knobs.dp * knobs.microbatches)
    probe = (profile.layer(knobs.model, knobs.seq_len, knobs.world_size, 1, b) or {}).get(zero_key(knobs.zero))
    if probe is None:
        return None
    n, elem = knobs.dp, PRECISION_BYTES[knobs.precision]
    rs, ag = profile.alpha_beta("reduce_scatter", n), profile.alpha_beta("all_gather", n)

    def traffic_s(c: Any) -> float:
        per_unit = [u * (n - 1) / n * elem for u in zero_unit_numels(c)]
        return sum(rs.time_s(x, 1) + (2 * ag.time_s(x, 1) if knobs.zero == 3 else 0.0) for x in per_unit)

    one = dataclasses.replace(cfg, n_layers=ZERO_PROBE_LAYERS)
    return knobs.microbatches * probe * traffic_s(cfg) / traffic_s(one)


def estimate(knobs: Any, profile: MachineProfile) -> Estimate:
    """Predicted step time and peak memory of one resolved cell (``bench.config.knobs.Knobs``)."""
    from impl.model_config import PRESETS

    cfg = PRESETS[knobs.model]
    m, pp = knobs.microbatches, knobs.pp
    per_rank, mem_bound, source = stage_times(knobs, cfg, profile)
    per_micro = max(per_rank)
    # A pipeline of stage times t_r takes Σ t_r + (m − 1)·max t_r: the first
    # micro-batch crosses every stage, the rest follow at the busiest one's pace;
    # balanced, the bubble Σ t_r − max t_r = (p − 1)·t is (p−1)/m of the ideal
    # m·t (Narayanan et al. 2021 §2.2); interleaving v chunks divides it by v.
    v = knobs.virtual_stages if pp > 1 and knobs.pp_schedule == "interleaved" else 1
    bubble = (sum(per_rank) - per_micro) / v
    comm, bus = comm_times(knobs, cfg, profile)
    in_place = zero_in_place(knobs, cfg, profile)
    notes = [f"compute: {source}"]
    if in_place is None:
        exposed_dp = exposed_dp_comm(knobs, cfg, comm, per_micro, profile.overlap_fraction(knobs.world_size))
    else:  # measured in place; ZeRO-2's all-gather after the step has nothing to hide behind
        exposed_dp = in_place + (comm.get("dp all_gather", 0.0) if knobs.zero == 2 else 0.0)
        notes.append(f"zero {knobs.zero}: in-place probe")
    critical_comm = sum(t for k, t in comm.items() if not k.startswith("dp "))
    psi_local = tp_local_params(cfg, knobs.tp) / pp
    shard = psi_local / (knobs.dp if knobs.zero else 1)
    rate = profile.optimizer_rate(knobs.optimizer, knobs.model, knobs.world_size, "flat" if knobs.zero else "tensors")
    # the step's measured seconds per parameter for this optimizer and layout, else the state streamed once
    optimizer = shard * (rate if rate is not None else ADAM_STREAM_BYTES / profile.mem_bandwidth_bytes_per_s)
    if knobs.offload != "none":
        optimizer += 2 * shard * 4 / profile.host_bandwidth_bytes_per_s
    state, act, loss, transient = memory(knobs, cfg)
    step = m * per_micro + bubble + exposed_dp + critical_comm + optimizer
    return Estimate(step_time_s=step, compute_s=m * per_micro, memory_bound_s=m * mem_bound, bubble_s=bubble,
                    comm_s=comm, exposed_comm_s=exposed_dp + critical_comm, optimizer_s=optimizer,
                    state_bytes=state, activation_bytes=act, loss_bytes=loss, transient_bytes=transient,
                    comm_bus_bytes=bus, notes=notes)
