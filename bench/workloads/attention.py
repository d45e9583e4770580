"""Sparse attention in the harness: the knobs → pattern mapping every adapter
and the FLOPs accounting share, and the `attention` workload.

`workload: attention` times one attention-core forward + backward per step at
the model's head shape — (batch_size ÷ world_size, n_heads, seq_len, head_dim)
q, k, v — through the same runner, meters and records as training cells. It
isolates the O(T²)-vs-O(T·w) term that whole-model step time hides behind the
linear layers at short sequences. The core is the one the adapter would put in
the model: dense SDPA (causal), the in-house block-gather engine (`inhouse`) or
compiled flex_attention (`torch`).
"""
from __future__ import annotations

from typing import Any, Callable

from impl.model_config import model_config
from impl.sparse_patterns import SparsePattern, density

ENGINES = {"inhouse": "block_gather", "torch": "flex"}


def pattern_for(knobs: Any) -> SparsePattern | None:
    """The cell's pattern (None for dense). The other parameters keep
    impl/sparse_patterns.py's defaults: 1 global block, 2 random blocks
    (seed 0, the same on every rank and run), dilation 2."""
    if knobs.attention == "dense":
        return None
    return SparsePattern(kind=knobs.attention, block=knobs.attention_block, window=knobs.attention_window,
                         causal=True)


ATTENTION_FLOPS_COUNTING = (
    "attention FLOPs = 12·H·d_head·S per layer and token × computed blocks ÷ all (S/block)² blocks, for every cell "
    "alike: a sparse pattern counts its blocks, dense causal attention its lower-triangle blocks nb(nb+1)/2 "
    "(the causal half, diagonal blocks whole), so dense and sparse MFU are like for like")


def attention_density(knobs: Any) -> float:
    """Computed blocks ÷ all blocks at ``attention_block`` granularity: a sparse
    pattern's layout, or for dense causal attention the lower triangle (diagonal
    blocks included), nb(nb+1)/2 of nb² — the same counting for both."""
    pattern = pattern_for(knobs)
    if pattern is None:
        nb = -(-knobs.seq_len // knobs.attention_block)
        return nb * (nb + 1) / 2 / nb**2
    return density(pattern, knobs.seq_len)


def sparse_notes(knobs: Any, model: Any) -> dict[str, Any]:
    """Replace the model's attention core with the adapter's sparse engine."""
    from impl.sparse_attention import apply_sparse_attention

    return apply_sparse_attention(model, pattern_for(knobs), ENGINES[knobs.adapter], seq_len=knobs.seq_len)


def build_attention_step(knobs: Any, device: Any) -> tuple[Callable[[int], None], dict[str, Any]]:
    import torch

    from impl.model import causal_attention
    from impl.sparse_attention import SparseAttentionCore

    cfg = model_config(knobs.model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[knobs.precision]
    shape = (knobs.batch_size // knobs.world_size or 1, cfg.n_heads, knobs.seq_len, cfg.head_dim)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    pattern = pattern_for(knobs)
    core = causal_attention if pattern is None else SparseAttentionCore(pattern, ENGINES[knobs.adapter])

    def step(_: int) -> None:
        for t in (q, k, v):
            t.grad = None
        core(q, k, v).backward(grad_out)

    notes = {"workload": "attention", "shape_bhtd": list(shape), "dtype": str(dtype).removeprefix("torch."),
             "core": "F.scaled_dot_product_attention(is_causal=True)" if pattern is None
             else f"impl.sparse_attention {ENGINES[knobs.adapter]} ({pattern.kind})",
             "density": attention_density(knobs)}
    return step, notes
