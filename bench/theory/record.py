"""The theory block of a record: every applicable formula evaluated for one cell's knobs,
and measured ÷ predicted ratios.

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

import math
from typing import Any

from bench.theory.convergence import STRIDES, loss_floor
from bench.theory.cost import Cost
from bench.theory.data_parallel import allreduce_cost, dp_comm_cost, onebit_comm_bytes, onebit_comm_cost, onebit_volume_reduction
from bench.theory.memory import PRECISION_BYTES, activation_bytes_per_layer, activation_values_per_layer, model_state_bytes, optimizer_state_bytes
from bench.theory.pipeline import PIPELINE_SOURCE, bubble_fraction, pipeline_p2p_bytes
from bench.theory.ring import ring_sp_comm_cost
from bench.theory.tensor_parallel import pp_tp_cost_by_rank, tp_comm_cost, tp_local_params, tp_param_shapes
from bench.theory.tensor_parallel_nd import tp2d_comm_cost, tp2d_param_shapes, tp3d_comm_cost, tp3d_local_params, tp3d_param_shapes


THEORY_VERSION = "zero-sc20+korthikanti22+pipedream+optimizer-state+onebit+megatron-tp+pp-p2p-v3+ring-sp+tp3d+tp2d+pp-tp+paper-terms"


def predict(knobs: Any, *, warmup: int | None = None, steps: int | None = None) -> dict[str, Any]:
    """The theory block of one record (None where a formula does not apply yet).
    ``warmup``/``steps`` (the run's) place the metered step, the last warm-up
    step, relative to 1-bit optimizers' ``freeze_step``."""
    from impl.model_config import PRESETS, param_shapes, total_params

    cfg = PRESETS[knobs.model]
    psi = total_params(cfg)
    if knobs.workload == "attention":  # one attention core, no model state, no communication
        return {"version": THEORY_VERSION, "params": None, "comm_bytes_per_step": None, "model_state_bytes": None,
                "bubble_fraction": None, "activation_bytes": None, "activation_bytes_model": None}
    pure_dp = knobs.tp == 1 and knobs.pp == 1 and knobs.cp == 1
    # Ring self-attention: the cp ranks split the sequence; weights replicated,
    # or Megatron-sharded over tp inside each cp rank.
    ring = knobs.cp > 1 and knobs.pp == 1
    tp_1d = knobs.tp > 1 and knobs.pp == 1 and knobs.tp_mode == "1d"
    tp_3d = knobs.tp > 1 and knobs.pp == 1 and knobs.dp == 1 and knobs.tp_mode == "3d"
    tp_2d = knobs.tp > 1 and knobs.pp == 1 and knobs.tp_mode in ("2d", "2.5d")
    depth_2d = knobs.tp_depth if knobs.tp_mode == "2.5d" else 1
    elem = PRECISION_BYTES[knobs.precision]
    cost: Cost | None = None
    if knobs.workload == "allreduce":
        cost = allreduce_cost(knobs.message_bytes, knobs.world_size, knobs.allreduce)
    elif pure_dp and knobs.zero == 0 and knobs.allreduce != "backend":
        cost = allreduce_cost(psi * elem, knobs.dp, knobs.allreduce)
    elif pure_dp and knobs.optimizer.startswith("onebit") and knobs.zero == 0 and warmup is not None:
        cost = onebit_comm_cost(psi, knobs.dp, compressed=warmup > knobs.freeze_step)
    elif pure_dp:
        cost = dp_comm_cost(psi, zero=knobs.zero, dp=knobs.dp, microbatches=knobs.microbatches, bytes_per_value=elem)
    elif knobs.pp > 1 and knobs.tp == 1 and knobs.dp == 1 and knobs.pp_schedule in ("gpipe", "1f1b", "interleaved",
                                                                                    "pipedream"):
        cost = Cost(PIPELINE_SOURCE, max(_pipeline_comm_by_rank(knobs, cfg, elem, warmup)))
    elif (knobs.pp > 1 and (knobs.tp > 1 or knobs.dp > 1) and knobs.tp_mode == "1d" and knobs.zero == 0
          and knobs.pp_schedule in ("gpipe", "1f1b", "interleaved")):
        cost = max(pp_tp_cost_by_rank(cfg, b=knobs.batch_size // knobs.dp, s=knobs.seq_len, tp=knobs.tp,
                                      pp=knobs.pp, microbatches=knobs.microbatches, dp=knobs.dp,
                                      virtual_stages=knobs.virtual_stages if knobs.pp_schedule == "interleaved" else 1,
                                      sequence_parallel=knobs.sequence_parallel == "megatron",
                                      bytes_per_value=elem), key=lambda c: c.total)
    elif ring and knobs.zero == 0:
        cost = ring_sp_comm_cost(cfg, b=knobs.batch_size // knobs.dp, s=knobs.seq_len, ring=knobs.cp, tp=knobs.tp,
                                 dp=knobs.dp, bytes_per_value=elem)
    elif tp_1d and knobs.zero == 0:
        cost = tp_comm_cost(cfg, b=knobs.batch_size // knobs.dp, s=knobs.seq_len, tp=knobs.tp, dp=knobs.dp,
                            sequence_parallel=knobs.sequence_parallel == "megatron", bytes_per_value=elem)
    elif tp_3d and knobs.zero == 0:
        cost = tp3d_comm_cost(cfg, b=knobs.batch_size, s=knobs.seq_len, tp=knobs.tp,
                              microbatches=knobs.microbatches, bytes_per_value=elem)
    elif tp_2d and knobs.zero == 0:
        cost = tp2d_comm_cost(cfg, b=knobs.batch_size // knobs.dp, s=knobs.seq_len, tp=knobs.tp, depth=depth_2d,
                              dp=knobs.dp, microbatches=knobs.microbatches, bytes_per_value=elem)
    comm = cost.total if cost is not None else None
    try:
        opt_bytes = optimizer_state_bytes(param_shapes(cfg), knobs.optimizer, dp=knobs.dp)
        state = model_state_bytes(psi, zero=knobs.zero, dp=knobs.dp, precision=knobs.precision,
                                  optimizer=knobs.optimizer, offload=knobs.offload != "none", optimizer_bytes=opt_bytes)
    except ValueError:
        state = None
    if tp_1d:
        # Megatron 1D TP: every matrix split by t, norms whole; ZeRO then divides by N_d.
        try:
            opt_bytes = optimizer_state_bytes(tp_param_shapes(cfg, knobs.tp), knobs.optimizer, dp=knobs.dp)
            state = model_state_bytes(tp_local_params(cfg, knobs.tp), zero=knobs.zero, dp=knobs.dp,
                                      precision=knobs.precision, optimizer=knobs.optimizer,
                                      offload=knobs.offload != "none", optimizer_bytes=opt_bytes)
        except ValueError:
            state = None
    elif tp_3d:
        # 3D TP: every matrix ÷ q³, norm weights ÷ q (replicated over a plane).
        try:
            opt_bytes = optimizer_state_bytes(tp3d_param_shapes(cfg, knobs.tp), knobs.optimizer)
            state = model_state_bytes(tp3d_local_params(cfg, knobs.tp), zero=0, dp=1, precision=knobs.precision,
                                      optimizer=knobs.optimizer, optimizer_bytes=opt_bytes)
        except ValueError:
            state = None
    elif tp_2d:
        # 2D/2.5D TP: every matrix and the embedding ÷ q², norm weights ÷ q (replicated over rows and depth).
        try:
            shapes = tp2d_param_shapes(cfg, knobs.tp, depth=depth_2d)
            state = model_state_bytes(sum(math.prod(v) for v in shapes.values()), zero=0, dp=1,
                                      precision=knobs.precision, optimizer=knobs.optimizer,
                                      optimizer_bytes=optimizer_state_bytes(shapes, knobs.optimizer))
        except ValueError:
            state = None
    elif state is not None and not (pure_dp or ring):
        state = None  # PP sharding formulas arrive with pipeline parallelism
    state_cost = _model_state_cost(knobs, state, cfg) if state is not None else None
    micro_b = knobs.batch_size // (knobs.dp * knobs.microbatches)
    act = cfg.n_layers * activation_bytes_per_layer(
        s=knobs.seq_len // knobs.cp, b=micro_b, h=cfg.dim, a=cfg.n_heads, tp=knobs.tp,
        sequence_parallel=knobs.sequence_parallel == "megatron", recompute=knobs.checkpointing,
        bytes_per_value=elem,
    )
    extra = {}
    if knobs.optimizer.startswith("onebit") and knobs.dp > 1 and warmup is not None and steps is not None:
        r = onebit_comm_bytes(psi, knobs.dp, compressed=False) / onebit_comm_bytes(psi, knobs.dp, compressed=True)
        w = min(1.0, knobs.freeze_step / (warmup + steps))
        extra = {"onebit_step_compression": r, "onebit_run_volume_reduction": onebit_volume_reduction(w, r)}
    return {
        **extra,
        "version": THEORY_VERSION,
        "params": psi,
        "comm_bytes_per_step": comm,
        "comm_cost": cost.record() if cost is not None else None,
        "model_state_bytes": state,
        "model_state_cost": state_cost.record() if state_cost is not None else None,
        "bubble_fraction": bubble_fraction(knobs.pp, knobs.microbatches, knobs.pp_schedule, knobs.virtual_stages),
        "activation_bytes": act,
        "activation_bytes_model": (_model_activation_bytes(knobs, cfg, micro_b)
                                   if pure_dp or (ring and knobs.tp == 1) else None),
        "loss_floor": loss_floor(seq_len=knobs.seq_len, vocab_size=cfg.vocab_size, strides=STRIDES),
    }


MODEL_STATE_SOURCE = ("Rajbhandari et al. 2020 (ZeRO) §5, Fig. 1: per rank (2 + 2 + K)Ψ with mixed precision "
                      "(K = 12 for Adam, fp32 master inside K), optimizer states ÷N_d at stage 1, gradients too at "
                      "stage 2, parameters too at stage 3; Ψ is the rank's shard under tensor parallelism")
OFFLOAD_MASTER_TERM = ("fp32 training with optimizer offload keeps a host fp32 master copy of the shard, 4Ψ/N_d (a CPU "
                       "optimizer cannot update device parameters in place; ZeRO-Offload's mixed-precision "
                       "accounting already holds it in K)")


def _model_state_cost(knobs: Any, state: dict[str, float], cfg: Any) -> Cost:
    """The model-state prediction split: ZeRO's accounting and, named, the host
    master copy an fp32 cell adds under offload (``model_state_bytes``)."""
    total = sum(state.values())
    master = 0.0
    if knobs.offload != "none" and knobs.precision == "fp32":
        from impl.model_config import total_params

        psi = tp_local_params(cfg, knobs.tp) if knobs.tp > 1 and knobs.tp_mode == "1d" else total_params(cfg)
        master = 4 * psi / (knobs.dp if knobs.zero >= 1 else 1)
    return Cost(MODEL_STATE_SOURCE, total - master).plus(OFFLOAD_MASTER_TERM, master)


def _pipeline_comm_by_rank(knobs: Any, cfg: Any, elem: int, warmup: int | None) -> list[float]:
    """Per pipeline rank p2p bytes of the metered step (the last warm-up step). PipeDream's
    first step only: rank r's backward sends lag its forwards by p−r−1 (counted per rank)."""
    v = knobs.virtual_stages if knobs.pp_schedule == "interleaved" else 1
    kw = dict(pp=knobs.pp, microbatches=knobs.microbatches, micro_batch=knobs.batch_size // knobs.microbatches,
              seq_len=knobs.seq_len, dim=cfg.dim, virtual_stages=v, bytes_per_value=elem)
    if knobs.pp_schedule == "pipedream" and warmup == 1:
        return [pipeline_p2p_bytes(**kw, backward_sends=max(0, knobs.microbatches - (knobs.pp - r - 1)))[r]
                for r in range(knobs.pp)]
    return pipeline_p2p_bytes(**kw)


def _model_activation_bytes(knobs: Any, cfg: Any, micro_b: int) -> float:
    """This decoder's activations for one micro-batch on one rank (fp32 values;
    ``activation_values_per_layer``), with every ``checkpoint_every``-th block
    keeping only its input under full recompute. Ring sequence parallel: the
    rank's s/r tokens (Li et al. 2021)."""
    s = knobs.seq_len // knobs.cp
    plain = activation_values_per_layer(cfg, s, micro_b, "none")
    wrapped = cfg.n_layers // knobs.checkpoint_every if knobs.checkpointing != "none" else 0
    kept = activation_values_per_layer(cfg, s, micro_b, knobs.checkpointing) if wrapped else 0
    return 4.0 * ((cfg.n_layers - wrapped) * plain + wrapped * kept)


def ratios(metrics: dict[str, Any], theory: dict[str, Any]) -> dict[str, float | None]:
    """measured ÷ predicted for each quantity both sides have."""
    def ratio(m: float | None, t: float | None) -> float | None:
        if m is None or t is None:
            return None
        if t == 0:
            return 1.0 if m == 0 else None
        return m / t

    out: dict[str, float | None] = {"comm_bytes_per_step": ratio(metrics.get("comm_bytes_per_step"), theory.get("comm_bytes_per_step"))}
    state_m, state_t = metrics.get("model_state_bytes"), theory.get("model_state_bytes")
    if state_m and state_t:
        for k in ("params", "grads", "optimizer"):
            out[f"model_state_{k}"] = ratio(state_m.get(k), state_t.get(k))
        out["model_state_total"] = ratio(sum(state_m.values()), sum(state_t.values()))
    return out
