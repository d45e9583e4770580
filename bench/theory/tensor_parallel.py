"""1D tensor parallelism (Megatron, Shoeybi et al. 2019) and Megatron sequence parallelism
(Korthikanti et al. 2022): local parameter shapes and communication, also inside a pipeline.

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

import math
from typing import Any

from bench.theory.cost import Cost, add, allreduce_bus_factor
from bench.theory.pipeline import pipeline_p2p_bytes

MEGATRON_SOURCE = ("Narayanan et al. 2021 (Megatron-LM on GPU clusters, arXiv 2104.04473) §3: tensor parallelism "
                   "all-reduces twice in forward and twice in backward per layer, 8bsh(t−1)/t values per "
                   "layer and micro-batch per device (Shoeybi et al. 2019 §3, Fig. 3); sequence parallelism "
                   "(Korthikanti et al. 2022 §4.2.2) replaces each all-reduce by an all-gather + reduce-scatter "
                   "of the same volume; pipeline stages exchange bsh per micro-batch and direction")

EMBED_TERM = ("vocab-parallel embedding's forward all-reduce and the head input's backward all-reduce, 2bsh·2(t−1)/t "
              "(Shoeybi et al. §3; outside the per-layer count)")
LOSS_TERM = "vocab-parallel cross-entropy: 3 fp32 all-reduces of b·s values (max, target logit, Σexp)"
SP_NORM_TERM = ("sequence-parallel norm weights: their gradients all-reduced over the tp group, "
                "(2L+1)·h·2(t−1)/t (replicated weights that see only s/t tokens each)")
DP_TERM = "data-parallel gradient all-reduce of the rank's shard, 2Ψ_tp(N_d−1)/N_d (ZeRO §7.1)"


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


def megatron_layer_bytes(*, b: int, s: int, h: int, tp: int, bytes_per_value: int = 4) -> float:
    """One transformer layer's tensor-parallel traffic per rank (``MEGATRON_SOURCE``):
    8bsh(t−1)/t values, b sequences of s tokens (all micro-batches together)."""
    return 8 * b * s * h * (tp - 1) / tp * bytes_per_value


def tp_comm_cost(cfg: Any, *, b: int, s: int, tp: int, dp: int = 1, sequence_parallel: bool = False,
                 bytes_per_value: int = 4) -> Cost:
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
    e, h, L = bytes_per_value, cfg.dim, cfg.n_layers
    ar = allreduce_bus_factor(tp)
    return (Cost(MEGATRON_SOURCE, L * megatron_layer_bytes(b=b, s=s, h=h, tp=tp, bytes_per_value=e))
            .plus(EMBED_TERM, 2 * b * s * h * e * ar)
            .plus(LOSS_TERM, 3 * b * s * 4 * ar)
            .plus(SP_NORM_TERM, (2 * L + 1) * h * e * ar if sequence_parallel else 0.0)
            .plus(DP_TERM, 2 * tp_local_params(cfg, tp) * e * (dp - 1) / dp))


def tp_comm_bytes(cfg: Any, *, b: int, s: int, tp: int, dp: int = 1, sequence_parallel: bool = False,
                  bytes_per_value: int = 4) -> float:
    """``tp_comm_cost``'s total."""
    return tp_comm_cost(cfg, b=b, s=s, tp=tp, dp=dp, sequence_parallel=sequence_parallel,
                        bytes_per_value=bytes_per_value).total


def pp_tp_cost_by_rank(cfg: Any, *, b: int, s: int, tp: int, pp: int, microbatches: int, virtual_stages: int = 1,
                       dp: int = 1, sequence_parallel: bool = False, bytes_per_value: int = 4) -> list[Cost]:
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

    h, ar, elem = cfg.dim, allreduce_bus_factor(tp), bytes_per_value
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
        parts = [Cost(MEGATRON_SOURCE, p2p[r])]  # bsh per micro-batch and boundary (bsh/t under SP)
        for st in range(r, n_stages, pp):
            first, last, n_blocks = st == 0, st == n_stages - 1, len(cut[st])
            local = sum(blocks[i] for i in cut[st]) + first * embed + last * head
            parts.append(Cost(MEGATRON_SOURCE, n_blocks * megatron_layer_bytes(b=b, s=s, h=h, tp=tp, bytes_per_value=elem), {
                EMBED_TERM: (first + last) * b * s * h * elem * ar,
                LOSS_TERM: last * 3 * b * s * 4 * ar,
                SP_NORM_TERM: (2 * n_blocks + last) * h * elem * ar if sequence_parallel else 0.0,
                DP_TERM: 2 * local * elem * (dp - 1) / dp}))
        out.append(add(parts))
    return out


def pp_tp_comm_by_rank(cfg: Any, **kw: Any) -> list[float]:
    """``pp_tp_cost_by_rank``'s totals."""
    return [c.total for c in pp_tp_cost_by_rank(cfg, **kw)]
