"""1D tensor parallelism (Megatron, Shoeybi et al. 2019) and Megatron sequence parallelism
(Korthikanti et al. 2022): local parameter shapes and communication, also inside a pipeline.

Pure Python, no torch. Ψ = parameters, N_d = data-parallel ranks, K = optimizer bytes per parameter.
"""
from __future__ import annotations

import math
from typing import Any

from bench.theory.pipeline import pipeline_p2p_bytes


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
