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

Memory per device: ``bench.plan.memory_model``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.theory import (PRECISION_BYTES, activation_values_per_layer, dp_comm_elements,
                          tp_comm_bytes, tp_local_params)
from bench.plan.machine import MachineProfile
from bench.plan.memory_model import memory, zero_unit_numels

ELEMENTWISE_PASSES = 4
"""Each saved activation is written in forward, read in backward, and its gradient written and read."""
OPS_PER_LAYER = 50
"""Autograd ops in one ``impl.model.Block`` forward (norms 2×6, 7 linears, RoPE 2×9, views, SDPA, SwiGLU, residuals)."""
ADAM_STREAM_BYTES = 28
DDP_BUCKET_BYTES = 25 * 2**20


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
