"""The papers' formulas, as functions (DESIGN.md "Theory"). Pure Python, no torch.

Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

import math
from typing import Any

THEORY_VERSION = "zero-sc20+korthikanti22+pipedream+optimizer-state+onebit+megatron-tp+pp-p2p-v3+ring-sp+tp3d+tp2d+pp-tp"

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


def dp_comm_elements(psi: float, *, zero: int, dp: int, microbatches: int = 1) -> float:
    """Elements each rank moves per step (bus volume): DDP, ZeRO-1 and ZeRO-2
    2Ψ(N−1)/N (all-reduce or reduce-scatter + all-gather); ZeRO-3 3Ψ(N−1)/N
    (an extra parameter all-gather in backward).

    With m micro-batches of gradient accumulation, DDP and ZeRO-1 still
    reduce once; ZeRO-2 and ZeRO-3 keep no full gradients, so they
    reduce-scatter every micro-batch (and ZeRO-3 gathers parameters for each
    micro-batch's forward and backward): (m+1)Ψ(N−1)/N and 3mΨ(N−1)/N."""
    if dp == 1:
        return 0.0
    m = microbatches
    factor = {0: 2, 1: 2, 2: m + 1, 3: 3 * m}[zero]
    return factor * psi * (dp - 1) / dp


def allreduce_bytes_sent(size_bytes: float, n: int, algorithm: str) -> float:
    """Bytes the busiest rank sends for one all-reduce of ``size_bytes`` (impl/allreduce.py):
    ring and sharded PS 2S(N−1)/N; binary tree (1 up + children down)·S at the
    busiest node; single parameter server (N−1)·S at the server."""
    if n == 1:
        return 0.0
    if algorithm in ("backend", "ring", "ps_sharded"):
        return 2 * size_bytes * (n - 1) / n
    if algorithm == "tree":
        busiest = max((r > 0) + sum(c < n for c in (2 * r + 1, 2 * r + 2)) for r in range(n))
        return busiest * size_bytes
    if algorithm == "ps":
        return (n - 1) * size_bytes
    raise ValueError(f"unknown all-reduce algorithm {algorithm!r}")


def bubble_fraction(pp: int, microbatches: int, schedule: str, virtual_stages: int = 1) -> float | None:
    """Idle fraction of ideal time: (p−1)/m for GPipe and 1F1B; (p−1)/(v·m) interleaved
    (Narayanan et al. 2021, §2.2). Assumes equal stage times and free communication; for
    measured, unequal op times see ``impl.pipeline_bubble.replay`` (equal to this at equal times)."""
    if pp == 1:
        return None
    if schedule == "interleaved":
        return (pp - 1) / (virtual_stages * microbatches)
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / microbatches
    return None


def pipeline_p2p_bytes(*, pp: int, microbatches: int, micro_batch: int, seq_len: int, dim: int,
                       virtual_stages: int = 1, bytes_per_value: int = 4,
                       backward_sends: int | None = None) -> list[float]:
    """Bus bytes each pipeline rank sends per step (send factor 1; a recv counts 0):
    one (b/m, s, h) hidden state per micro-batch across every stage boundary
    forward, and its gradient backward (GPipe, Huang et al. 2019; 1F1B and
    interleaved, Narayanan et al. 2021 §2.2, loop placement: rank r holds
    stages r, r+p, …, so it sends forward from each stage but the last and
    backward from each but the first). ``backward_sends`` overrides the m
    backward messages per stage (PipeDream's first step runs m − (p−r−1))."""
    act = micro_batch * seq_len * dim * bytes_per_value
    n_stages = pp * virtual_stages
    out = []
    for r in range(pp):
        mine = [r + c * pp for c in range(virtual_stages)]
        fwd = sum(s < n_stages - 1 for s in mine) * microbatches
        bwd_per = microbatches if backward_sends is None else backward_sends
        bwd = sum(s > 0 for s in mine) * (bwd_per if virtual_stages == 1 else microbatches)
        out.append(float((fwd + bwd) * act))
    return out


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


def onebit_comm_bytes(psi: int, dp: int, *, compressed: bool, bytes_per_grad: int = 4) -> float:
    """Bus bytes per rank of one 1-bit Adam/LAMB step (Tang et al. 2021): a warm-up
    step all-reduces the gradients, 2Ψ(N−1)/N values; a compressed step sends
    the momentum's signs, 1 bit per value (Ψ padded to a multiple of 8N), plus
    one fp32 scale per rank, once in an all-to-all and once in an all-gather,
    each ×(N−1)/N."""
    if dp == 1:
        return 0.0
    if not compressed:
        return 2 * psi * (dp - 1) / dp * bytes_per_grad
    padded = -(-psi // (8 * dp)) * 8 * dp
    return 2 * (padded // 8 + 4 * dp) * (dp - 1) / dp


def onebit_volume_reduction(warmup_fraction: float, compression: float) -> float:
    """Whole-run volume of full-precision ÷ 1-bit training: 1/(w + (1−w)/r) for
    warm-up fraction w and per-step compression r (DESIGN.md's r = 16 is
    against fp16 gradients; against fp32 r ≈ 32)."""
    return 1 / (warmup_fraction + (1 - warmup_fraction) / compression)


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
    pure_dp = knobs.tp == 1 and knobs.pp == 1
    # Ring self-attention: the tp ranks split the sequence, weights replicated.
    ring = knobs.sequence_parallel == "ring" and knobs.tp > 1 and knobs.pp == 1
    tp_1d = knobs.tp > 1 and knobs.pp == 1 and knobs.tp_mode == "1d" and not ring
    tp_3d = knobs.tp > 1 and knobs.pp == 1 and knobs.dp == 1 and knobs.tp_mode == "3d"
    tp_2d = knobs.tp > 1 and knobs.pp == 1 and knobs.tp_mode in ("2d", "2.5d")
    depth_2d = knobs.tp_depth if knobs.tp_mode == "2.5d" else 1
    elem = PRECISION_BYTES[knobs.precision]
    comm = None
    if knobs.workload == "allreduce":
        comm = allreduce_bytes_sent(knobs.message_bytes, knobs.world_size, knobs.allreduce)
    elif pure_dp and knobs.zero == 0 and knobs.allreduce != "backend":
        comm = allreduce_bytes_sent(psi * elem, knobs.dp, knobs.allreduce)
    elif pure_dp and knobs.optimizer.startswith("onebit") and knobs.zero == 0 and warmup is not None:
        comm = onebit_comm_bytes(psi, knobs.dp, compressed=warmup > knobs.freeze_step)
    elif pure_dp:
        comm = dp_comm_elements(psi, zero=knobs.zero, dp=knobs.dp, microbatches=knobs.microbatches) * elem
    elif knobs.pp > 1 and knobs.tp == 1 and knobs.dp == 1 and knobs.pp_schedule in ("gpipe", "1f1b", "interleaved",
                                                                                    "pipedream"):
        comm = max(_pipeline_comm_by_rank(knobs, cfg, elem, warmup))
    elif (knobs.pp > 1 and (knobs.tp > 1 or knobs.dp > 1) and knobs.tp_mode == "1d" and knobs.zero == 0
          and knobs.pp_schedule in ("gpipe", "1f1b", "interleaved")):
        comm = max(pp_tp_comm_by_rank(cfg, b=knobs.batch_size // knobs.dp, s=knobs.seq_len, tp=knobs.tp,
                                      pp=knobs.pp, microbatches=knobs.microbatches, dp=knobs.dp,
                                      virtual_stages=knobs.virtual_stages if knobs.pp_schedule == "interleaved" else 1,
                                      sequence_parallel=knobs.sequence_parallel == "megatron",
                                      bytes_per_value=elem))
    elif ring and knobs.zero == 0:
        comm = ring_sp_comm_bytes(cfg, b=knobs.batch_size // knobs.dp, s=knobs.seq_len, ring=knobs.tp, dp=knobs.dp,
                                  bytes_per_value=elem)
    elif tp_1d and knobs.zero == 0:
        comm = tp_comm_bytes(cfg, b=knobs.batch_size // knobs.dp, s=knobs.seq_len, tp=knobs.tp, dp=knobs.dp,
                             sequence_parallel=knobs.sequence_parallel == "megatron", bytes_per_value=elem)
    elif tp_3d and knobs.zero == 0:
        comm = tp3d_comm_bytes(cfg, b=knobs.batch_size, s=knobs.seq_len, tp=knobs.tp,
                               microbatches=knobs.microbatches, bytes_per_value=elem)
    elif tp_2d and knobs.zero == 0:
        comm = tp2d_comm_bytes(cfg, b=knobs.batch_size // knobs.dp, s=knobs.seq_len, tp=knobs.tp, depth=depth_2d,
                               dp=knobs.dp, microbatches=knobs.microbatches, bytes_per_value=elem)
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
    micro_b = knobs.batch_size // (knobs.dp * knobs.microbatches)
    act = cfg.n_layers * activation_bytes_per_layer(
        s=knobs.seq_len // knobs.tp if ring else knobs.seq_len, b=micro_b, h=cfg.dim, a=cfg.n_heads,
        tp=1 if ring else knobs.tp,
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
        "model_state_bytes": state,
        "bubble_fraction": bubble_fraction(knobs.pp, knobs.microbatches, knobs.pp_schedule, knobs.virtual_stages),
        "activation_bytes": act,
        "activation_bytes_model": _model_activation_bytes(knobs, cfg, micro_b) if pure_dp or ring else None,
    }


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
    s = knobs.seq_len // knobs.tp if knobs.sequence_parallel == "ring" else knobs.seq_len
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


# ---- 1D tensor parallelism (Megatron) and Megatron sequence parallelism ----

def tp_param_shapes(cfg: Any, tp: int) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape on one rank of a 1D tensor-parallel group
    (``impl.tensor_parallel``): column-parallel wq/wk/wv/w1/w3, the vocab-parallel
    embedding and head split on dim 0, row-parallel wo/w2 on dim 1, norms replicated."""
    from impl.model_config import param_shapes

    out = {}
    for name, shape in param_shapes(cfg).items():
        if len(shape) == 1:
            out[name] = shape
        elif name.endswith(("wo.weight", "w2.weight")):
            out[name] = (shape[0], shape[1] // tp)
        else:
            out[name] = (shape[0] // tp, shape[1])
    return out


def tp_local_params(cfg: Any, tp: int) -> int:
    """Parameters one tensor-parallel rank holds: every matrix (and the
    embedding) ÷ t, the 2L+1 norm vectors whole."""
    total = 0
    for shape in tp_param_shapes(cfg, tp).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def tp_comm_bytes(cfg: Any, *, b: int, s: int, tp: int, dp: int = 1, sequence_parallel: bool = False,
                  bytes_per_value: int = 4) -> float:
    """Bus bytes per rank and step of Megatron 1D TP with a vocab-parallel loss
    (Shoeybi et al. 2019 §3; ``impl.tensor_parallel``), b sequences of s tokens
    per data-parallel replica (all micro-batches together), h = dim:

    * per block 4 all-reduces of (b, s, h): g after wo and w2 (forward), f
      before wq/wk/wv and w1/w3 (backward); plus the vocab-parallel embedding's
      forward g and the head input's backward f → (4L + 2)·b·s·h values, each
      all-reduce ×2(t−1)/t bus bytes;
    * the vocab-parallel cross-entropy: 3 all-reduces of b·s fp32 values (max,
      target logit, Σexp; Megatron's ``_VocabParallelCrossEntropy``);
    * sequence parallel (Korthikanti et al. 2022 §4.2.2): each all-reduce of
      (b, s, h) becomes an all-gather + a reduce-scatter, (t−1)/t each — the
      same bus bytes — and the 2L+1 norm weights' gradients are all-reduced
      over the group (h values each);
    * data parallel on top: the rank's gradients, 2Ψ_tp(N_d−1)/N_d.
    """
    h, L = cfg.dim, cfg.n_layers
    ar = 2 * (tp - 1) / tp
    act = (4 * L + 2) * b * s * h * bytes_per_value * ar
    loss = 3 * b * s * 4 * ar
    norms = (2 * L + 1) * h * bytes_per_value * ar if sequence_parallel else 0.0
    grads = 2 * tp_local_params(cfg, tp) * bytes_per_value * (dp - 1) / dp
    return act + loss + norms + grads



def pp_tp_comm_by_rank(cfg: Any, *, b: int, s: int, tp: int, pp: int, microbatches: int, virtual_stages: int = 1,
                       dp: int = 1, sequence_parallel: bool = False, bytes_per_value: int = 4) -> list[float]:
    """Bus bytes per step of each pipeline rank (any tp rank: they are alike) of
    a dp × tp × pp grid (``bench.adapters.inhouse.pipeline`` with tp > 1): every stage
    Megatron-sharded, cut by parameters exactly as ``impl.pipeline.partition_model``
    cuts the sharded model, b sequences per replica. A rank sums over its stages:

    * ``tp_comm_bytes``'s terms restricted to the stage: 4 (b, s, h) all-reduces
      per block, + the embedding's forward g on stage 0, + the head input's
      backward f and the loss's 3 (b, s) all-reduces on the last stage; under
      sequence parallel the same bus bytes as all-gather/reduce-scatter, plus the
      stage's norm weights' gradients all-reduced once per step;
    * the p2p sends of ``pipeline_p2p_bytes`` with (b/m, s/t, h) hidden states under
      sequence parallel (each tp rank sends its shard), (b/m, s, h) otherwise (each
      tp rank sends its replica to its counterpart in the next stage);
    * the dp all-reduce of the stage's local gradients, 2Ψ_stage(N_d−1)/N_d."""
    from impl.pipeline import partition_layers

    h, ar, elem = cfg.dim, 2 * (tp - 1) / tp, bytes_per_value
    shapes = tp_param_shapes(cfg, tp)
    count = lambda prefix: sum(math.prod(v) for k, v in shapes.items() if k.startswith(prefix))  # noqa: E731
    blocks = [count(f"layers.{i}.") for i in range(cfg.n_layers)]
    embed, head = count("tok_embeddings."), count("norm.") + count("output.")
    n_stages = pp * virtual_stages
    cut = partition_layers(blocks, n_stages, first_extra=embed, last_extra=head)
    p2p = pipeline_p2p_bytes(pp=pp, microbatches=microbatches, micro_batch=b // microbatches,
                             seq_len=s // tp if sequence_parallel else s, dim=h, virtual_stages=virtual_stages,
                             bytes_per_value=elem)
    out = []
    for r in range(pp):
        total = p2p[r]
        for st in range(r, n_stages, pp):
            first, last, n_blocks = st == 0, st == n_stages - 1, len(cut[st])
            total += (4 * n_blocks + first + last) * b * s * h * elem * ar + last * 3 * b * s * 4 * ar
            if sequence_parallel:
                total += (2 * n_blocks + last) * h * elem * ar
            local = sum(blocks[i] for i in cut[st]) + first * embed + last * head
            total += 2 * local * elem * (dp - 1) / dp
        out.append(float(total))
    return out

# ---- sequence parallel: ring self-attention (Li et al. 2021) ----

def ring_sp_comm_bytes(cfg: Any, *, b: int, s: int, ring: int, dp: int = 1, bytes_per_value: int = 4) -> float:
    """Bus bytes per rank and step of ring self-attention (arXiv 2105.13120;
    ``impl.ring_attention``), b sequences of s tokens per data-parallel replica
    split into r chunks of s/r; one K plus one V chunk = 2·b·(s/r)·h_a values
    (h_a = n_heads·head_dim: the core's K/V, after the GQA repeat):

    * per layer, forward: r − 1 K/V sends per rank (send bus factor 1);
    * backward: r − 1 K/V sends again (blocks are recomputed from the saved
      LSE) and r − 1 sends of the dK/dV accumulators → 3(r − 1) per layer;
    * the weight gradients, replicated on all W = r·N_d ranks, all-reduced
      over them: 2Ψ(W − 1)/W.
    """
    from impl.model_config import total_params

    chunk = 2 * b * (s // ring) * cfg.n_heads * cfg.head_dim * bytes_per_value
    p2p = cfg.n_layers * 3 * (ring - 1) * chunk
    w = ring * dp
    return p2p + 2 * total_params(cfg) * bytes_per_value * (w - 1) / w


# ---- 2D (SUMMA) and 2.5D (Tesseract) tensor parallelism ----

def tp2d_param_shapes(cfg: Any, tp: int, *, depth: int = 1) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape on one rank of a d × q × q grid (``impl.tensor_parallel_2d``,
    tp = q²·d): every matrix and the embedding (O, I) → (O/q, I/q), norm weights D/q."""
    from impl.model_config import param_shapes

    q = math.isqrt(tp // depth)
    if q * q * depth != tp:
        raise ValueError(f"2D/2.5D tensor parallelism needs tp = q²·depth, got tp = {tp}, depth = {depth}")
    return {name: tuple(d // q for d in shape) for name, shape in param_shapes(cfg).items()}


def tp2d_comm_bytes(cfg: Any, *, b: int, s: int, tp: int, depth: int = 1, dp: int = 1, microbatches: int = 1,
                    bytes_per_value: int = 4) -> float:
    """Bus bytes per rank and step of 2D (SUMMA, Xu et al. arXiv 2104.05343) or
    2.5D (Tesseract, arXiv 2105.14500) TP as ``impl.tensor_parallel_2d`` runs it:
    b sequences of s tokens per data-parallel replica, n = b·s/d tokens on each
    depth layer's q × q grid, f = (q−1)/q (all-gather / reduce-scatter bus
    factor), e bytes per value, m micro-batches:

    * each linear (O, I) (wq wk wv wo w1 w3 w2 per block, the head): SUMMA's
      input and weight all-gathers in forward and again in backward plus the
      ∂X and ∂W reduce-scatters: 3f·e·(n/q·I + m·I·O/q);
    * the embedding: reduce-scatter of (n, D/q) forward, all-gather backward: 2f·e·n·D/q;
    * RMSNorm: Σx² of n/q tokens all-reduced over the row forward and backward
      (fp32), 2L+1 norms; their weight gradients summed over the column, 2f·e·(2L+1)·D/q;
    * vocab-parallel loss: 3 all-reduces of n/q fp32 values over the row, and
      the mean over rows (and depth layers) of one fp32 value per micro-batch;
    * 2.5D: every gradient summed over the depth group, 2Ψ_rank·(d−1)/d;
      data parallel on top: 2Ψ_rank·(N_d−1)/N_d.
    """
    from impl.model_config import param_shapes

    shapes = tp2d_param_shapes(cfg, tp, depth=depth)
    q, m, e = math.isqrt(tp // depth), microbatches, bytes_per_value
    n, h, n_norms = b * s / depth, cfg.dim, 2 * cfg.n_layers + 1
    f = (q - 1) / q

    def ar(g: int) -> float:  # all-reduce bus factor over g ranks
        return 2 * (g - 1) / g

    psi_rank = sum(math.prod(v) for v in shapes.values())
    linears = sum(3 * f * e * (n / q * shape[1] + m * shape[0] * shape[1] / q)  # shape = (O, I)
                  for name, shape in param_shapes(cfg).items() if len(shape) == 2 and name != "tok_embeddings.weight")
    embedding = 2 * f * e * n * h / q
    norms = n_norms * 2 * ar(q) * 4 * n / q + ar(q) * e * n_norms * h / q
    loss = 3 * ar(q) * 4 * n / q + m * ar(q) * 4 + (m * ar(depth) * 4 if depth > 1 else 0.0)
    grads = (ar(depth) if depth > 1 else 0.0) * e * psi_rank + (ar(dp) if dp > 1 else 0.0) * e * psi_rank
    return linears + embedding + norms + loss + grads


# ---- 3D tensor parallelism (Bian et al. 2021, arXiv 2105.14450) ----

def _cube_side(tp: int) -> int:
    q = round(tp ** (1 / 3))
    if q**3 != tp:
        raise ValueError(f"3D tensor parallelism needs tp = q³, got tp = {tp}")
    return q


def tp3d_param_shapes(cfg: Any, tp: int) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape on one rank of a q×q×q cube (``impl.tensor_parallel_3d``):
    every matrix (O, I) → (O/q², I/q), each norm weight → its D/q slice."""
    from impl.model_config import param_shapes

    q = _cube_side(tp)
    return {name: (s[0] // q**2, s[1] // q) if len(s) == 2 else (s[0] // q,)
            for name, s in param_shapes(cfg).items()}


def tp3d_local_params(cfg: Any, tp: int) -> int:
    """Parameters one rank holds: Ψ_matrices/q³ plus (2L+1)·D/q of norm weights."""
    return sum(s[0] * (s[1] if len(s) == 2 else 1) for s in tp3d_param_shapes(cfg, tp).values())


def tp3d_comm_bytes(cfg: Any, *, b: int, s: int, tp: int, microbatches: int = 1,
                    bytes_per_value: int = 4) -> float:
    """Bus bytes per rank and step of 3D TP (``impl.tensor_parallel_3d``, whose
    docstring derives it), b sequences of s tokens, N = b·s, cube side q, and
    c = 2(q−1)/q³ for a forward + backward pair of all-gather / reduce-scatter:

    * each linear (O, I): its output reduce-scatter and the output gradient's
      gather, N·O; its input gather and input-gradient reduce-scatter, N·I (wo,
      w2 and the head; wq/wk/wv and w1/w3 share one gather per sub-layer, N·D
      each, 2L of them); the weight gather and weight-gradient reduce-scatter,
      O·I per micro-batch; the embedding, N·D and V·D per micro-batch;
    * RMSNorm: Σx² all-reduced over q ranks forward and backward, N/q² fp32
      values each, 2L+1 norms;
    * vocab-parallel loss: 3 all-reduces of N/q² fp32 values over q ranks;
    * the norm-weight gradients, (2L+1)·D/q values all-reduced over q² ranks.
    """
    from impl.model_config import param_shapes

    q = _cube_side(tp)
    n, h, n_norms = b * s, cfg.dim, 2 * cfg.n_layers + 1
    acts, weights = 2 * cfg.n_layers * n * h, 0
    for name, shape in param_shapes(cfg).items():
        if len(shape) == 1:
            continue
        o, i = shape
        weights += o * i
        if name == "tok_embeddings.weight":
            acts += n * h
        else:
            acts += n * o + (n * i if name.endswith(("wo.weight", "w2.weight", "output.weight")) else 0)
    ar = 2 * (q - 1) / q  # all-reduce bus factor over q ranks
    sum_sq = n_norms * 2 * ar * n / q**2 * 4
    loss = 3 * ar * n / q**2 * 4
    norm_grads = 2 * (q * q - 1) / (q * q) * n_norms * h / q * bytes_per_value
    return 2 * (q - 1) / q**3 * (acts + microbatches * weights) * bytes_per_value + sum_sq + loss + norm_grads
