"""Block-sparse attention: two engines that compute only a layout's blocks,
and the dense masked reference they are checked against.

Layouts come from ``impl.sparse_patterns`` ((nb, nb) bools over blocks of
``pattern.block`` tokens). q, k, v are (B, nh, T, hs), as ``Attention.core``
receives them; softmax scale 1/sqrt(hs), as SDPA.

* ``block_gather`` (pure PyTorch, any device, autograd): query blocks are
  grouped by how many key blocks they attend; per group the key/value blocks
  are gathered (index_select) and each query block attends its K·bs gathered
  keys through SDPA (fused kernel), causal within the diagonal block. Work and memory are ∝ computed blocks: O(T·w) for a band, not
  O(T²). No padding: rows with different counts are different groups (a
  handful per layout).
* ``flex`` — ``torch.nn.attention.flex_attention`` under ``torch.compile``
  with a ``BlockMask`` built from the same layout (off-diagonal blocks "full",
  causal diagonal blocks "partial" with a q >= k mask_mod), so the fused
  kernel skips every other block. torch 2.13 runs its backward on CUDA only
  ("FlexAttention does not support backward on CPU"); on CPU it is a
  forward-only engine.
* ``dense_masked_attention`` — SDPA with the equivalent (T, T) boolean mask:
  the reference, O(T²).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from impl.sparse_patterns import SparsePattern, band_width, block_layout, density

Engine = Literal["block_gather", "flex"]


def token_mask(pattern: SparsePattern, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, T) bool, True where query t attends key s: the layout expanded to
    tokens, and causal within it."""
    bs = pattern.block
    layout = torch.from_numpy(block_layout(pattern, seq_len)).to(device)
    mask = layout.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    if pattern.causal:
        mask &= torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    return mask


def dense_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Reference: SDPA over all T² scores with the pattern's boolean mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(pattern, q.shape[-2], q.device))


# ---------------------------------------------------------------- block gather

@dataclass(frozen=True, slots=True)
class _Group:
    rows: torch.Tensor  # (n,) query block ids
    cols: torch.Tensor  # (n·K,) key block ids, K per row, row-major
    k_blocks: int  # K
    bias: Any  # causal: CausalBias lower-right (bs, K·bs) — each row's last key block is its diagonal


@dataclass(frozen=True, slots=True)
class GatherPlan:
    block: int
    groups: tuple[_Group, ...]
    inverse: torch.Tensor  # (nb,) position of each query block in the concatenated group outputs


def gather_plan(pattern: SparsePattern, seq_len: int, device: torch.device | str = "cpu") -> GatherPlan:
    layout = block_layout(pattern, seq_len)
    bs = pattern.block
    counts = layout.sum(1)
    groups, order = [], []
    for count in sorted(set(counts.tolist())):
        rows = [i for i in range(len(counts)) if counts[i] == count]
        cols = [j for i in rows for j in layout[i].nonzero()[0].tolist()]
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        cols_t = torch.tensor(cols, dtype=torch.long, device=device)
        if pattern.causal:
            # Causal layouts are lower triangular with the diagonal present, so
            # each row's (ascending) key blocks end with its diagonal block: the
            # token mask is exactly SDPA's lower-right-aligned causal mask.
            assert all(layout[i].nonzero()[0][-1] == i for i in rows)
        groups.append(_Group(rows_t, cols_t, count, _lower_right(bs, count * bs) if pattern.causal else None))
        order += rows
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return GatherPlan(bs, tuple(groups), inverse.to(device))


def _lower_right(q_len: int, kv_len: int) -> Any:
    """A CausalBias cannot be created while a TorchDispatchMode is active (the
    harness's communication meter is one); it is a constant, so make it outside."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return causal_lower_right(q_len, kv_len)


def block_gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """Attention over the plan's blocks only; q, k, v (B, nh, T, hs) -> (B, nh, T, hs).

    Per group of n query blocks with K key blocks each, the gathered blocks go
    through SDPA as B × (nh·n) independent (bs × K·bs) attentions: the fused
    kernel keeps no (bs, K·bs) probability tensor for backward (only its
    log-sum-exp), so memory is the gathered K/V copies, O(T·K·hs). The causal
    mask is ``causal_lower_right`` (a CausalBias, not a boolean tensor), which
    keeps SDPA on its fused kernel; a boolean mask drops it to the math path."""
    B, H, T, D = q.shape
    bs = plan.block
    nb = T // bs
    qb, kb, vb = (x.reshape(B, H, nb, bs, D) for x in (q, k, v))
    outs = []
    for g in plan.groups:
        n, kv_len = g.rows.numel(), g.k_blocks * bs
        qg = qb.index_select(2, g.rows).reshape(B, H * n, bs, D)
        kg = kb.index_select(2, g.cols).reshape(B, H * n, kv_len, D)  # (B, nh·n, K·bs, hs)
        vg = vb.index_select(2, g.cols).reshape(B, H * n, kv_len, D)
        outs.append(F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.bias).reshape(B, H, n, bs, D))
    out = torch.cat(outs, dim=2).index_select(2, plan.inverse)  # back to block order
    return out.reshape(B, H, T, D)


# ---------------------------------------------------------------- flex_attention

_compiled_flex: Callable | None = None


def flex_block_mask(pattern: SparsePattern, seq_len: int, device: torch.device | str = "cpu") -> Any:
    """The layout as a ``BlockMask``: off-diagonal (and non-causal) blocks are
    full blocks (no mask_mod evaluated); causal diagonal blocks are partial,
    masked q >= k. The mask_mod encodes the whole token mask too, so torch's
    unfused (math) path gives the same answer."""
    from torch.nn.attention.flex_attention import BlockMask

    layout = torch.from_numpy(block_layout(pattern, seq_len)).to(device)
    nb, bs = layout.shape[0], pattern.block
    eye = torch.eye(nb, dtype=torch.bool, device=device)
    full, partial = (layout & ~eye, layout & eye) if pattern.causal else (layout, torch.zeros_like(layout))

    def indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (1, 1, nb) counts and (1, 1, nb, nb) column ids, the attended ones first.
        num = blocks.sum(-1, dtype=torch.int32)
        ids = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num[None, None], ids[None, None]

    if pattern.causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return layout[q_idx // bs, kv_idx // bs] & (q_idx >= kv_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return layout[q_idx // bs, kv_idx // bs]

    (kv_num, kv_ids), (full_num, full_ids) = indices(partial), indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_ids, full_num, full_ids, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(seq_len, seq_len))


def flex_kernel_options(block: int, device_type: str) -> dict[str, int] | None:
    """Triton tile sizes that divide the mask's block. flex_attention's CUDA
    kernels require every BlockMask block to be a multiple of their tiles, and on
    Hopper with bf16 and head dim 64 the default tiles are 128×128, so a 64-token
    block raised "Q and KV block size must be divisible by BLOCK_M and BLOCK_N".
    Blocks that are multiples of 128 keep the defaults; CPU has no tiles."""
    if device_type != "cuda" or block % 128 == 0:
        return None
    tile = block & -block  # the largest power of two dividing the block
    if tile < 16:
        raise ValueError(f"flex_attention tiles are at least 16 tokens; block {block} has no such divisor")
    tile = min(tile, 64)
    return {name: tile for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}


def flex_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    """Compiled flex_attention with the block mask (compiled once per process;
    recompiles per block size / causality, not per layout), with tiles that
    divide the block (``flex_kernel_options``)."""
    global _compiled_flex
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise NotImplementedError(
            f"flex_attention has no backward on CPU in torch {torch.__version__} "
            "('FlexAttention does not support backward on CPU'); use engine 'block_gather' for CPU training")
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    options = flex_kernel_options(block_mask.BLOCK_SIZE[0], q.device.type)
    return _compiled_flex(q, k, v, block_mask=block_mask, kernel_options=options)


# ---------------------------------------------------------------- the model's core

class SparseAttentionCore:
    """A drop-in ``Attention.core``: (B, nh, T, hs) q, k, v -> (B, nh, T, hs).
    Plans / block masks are built on first use per (T, device) and cached.
    A plain callable, not an nn.Module, so the module tree and parameter names
    of the model do not change."""

    def __init__(self, pattern: SparsePattern, engine: Engine = "block_gather") -> None:
        if engine not in ("block_gather", "flex"):
            raise ValueError(f"engine must be 'block_gather' or 'flex', not {engine!r}")
        self.pattern, self.engine = pattern, engine
        self._cache: dict[tuple[int, str], Any] = {}

    def _prepared(self, seq_len: int, device: torch.device) -> Any:
        key = (seq_len, str(device))
        if key not in self._cache:
            build = gather_plan if self.engine == "block_gather" else flex_block_mask
            self._cache[key] = build(self.pattern, seq_len, device)
        return self._cache[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        prepared = self._prepared(q.shape[-2], q.device)
        if self.engine == "block_gather":
            return block_gather_attention(q, k, v, prepared)
        return flex_sparse_attention(q, k, v, prepared)


def apply_sparse_attention(model: torch.nn.Module, pattern: SparsePattern, engine: Engine = "block_gather",
                           seq_len: int | None = None) -> dict[str, Any]:
    """Replace every block's ``attention.core`` (one shared core: one plan cache).
    Apply before activation checkpointing, which wraps the core it finds.
    Returns notes for the record (layout facts at ``seq_len`` when given)."""
    core = SparseAttentionCore(pattern, engine)
    for block in model.layers:
        block.attention.core = core
    notes: dict[str, Any] = {"pattern": pattern.kind, "engine": engine, "block": pattern.block,
                             "window": pattern.window, "causal": pattern.causal}
    if pattern.kind in ("dilated",):
        notes["dilation"] = pattern.dilation
    if pattern.kind in ("global", "longformer", "bigbird"):
        notes["global_blocks"] = pattern.global_blocks
    if pattern.kind in ("random", "bigbird"):
        notes.update(random_blocks=pattern.random_blocks, seed=pattern.seed)
    if seq_len is not None:
        layout = block_layout(pattern, seq_len)
        notes.update(density=density(pattern, seq_len), blocks_computed=int(layout.sum()),
                     band_width_blocks=band_width(layout))
    return notes
