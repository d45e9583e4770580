"""Block-wise dynamic (tree) quantization, Dettmers et al. 2021, "8-bit
Optimizers via Block-wise Quantization" (arXiv 2110.02861), Sec. 2.

The code map
------------
A 256-entry table ``Q`` of sorted values in [-1, 1] (signed) or [0, 1]
(unsigned). Following bitsandbytes' ``create_dynamic_map`` (the dynamic type
of Dettmers 2016, arXiv 1511.04561), the entries come in decades
``10^(i-6)``, i = 0..6: decade i holds the midpoints of ``k_i + 1`` points
evenly spaced on [0.1, 1], scaled by ``10^(i-6)``, with

    k_i = 2^i        (signed: each midpoint also appears negated)
    k_i = 2^(i+1)    (unsigned: the sign bit buys one more fraction bit)

plus 0 and 1.0.  Both give 254 + 2 = 256 values, so no padding is needed.
Small decades have few, coarse entries; the top decade [0.1, 1] has 64
(signed) or 128 (unsigned): precision is spent where the normalised values
are large, while values down to ~1e-7 of the block maximum stay non-zero.
Signed largest gap 0.9/64 (top decade); unsigned 0.9/128.  Note the signed
map has +1.0 but not -1.0: its most negative entry is -0.99297.

Block-wise quantization (Sec. 2)
-------------------------------------------
Flatten x to n values, split into B = ceil(n / block_size) blocks b, and

    N_b  = max_{j in b} |x_j|                       (one fp32 per block)
    q_j  = argmin_k |Q_k - x_j / N_b|               (one uint8 per value)
    x~_j = Q[q_j] * N_b                             (dequantize)

The nearest entry is found with ``searchsorted`` against the midpoints between
consecutive entries (ties go to the lower entry).  Round-trip error per value:

    |x_j - x~_j| <= N_b * max_gap(Q) / 2

with max_gap/2 = 0.00703 (signed) and 0.00352 (unsigned); the signed map's
missing -1.0 costs 1 - 0.99297 = 0.00703, no more (see ``roundtrip_bound``).
Pure torch, vectorised; works on any device.
"""
from __future__ import annotations

import math

import torch

DEFAULT_BLOCK_SIZE = 2048  # Dettmers et al. 2021, Sec. 2 (bitsandbytes' optimizers use 256)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic tree code map: 2**total_bits sorted fp32 values (see module doc).

    Mirrors bitsandbytes.functional.create_dynamic_map entry for entry (the
    same fp32 linspace, midpoints and scaling, in the same order).
    """
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    values: list[float] = []

    def add_decade(scale: float, n_items: int) -> None:
        edges = torch.linspace(0.1, 1, n_items + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values.extend((scale * means).tolist())  # scaled in fp32, as bitsandbytes does
        if signed:
            values.extend((-scale * means).tolist())

    for i in range(max_exponent_bits):
        extra = 0 if signed else 1  # unsigned: the sign bit becomes a fraction bit
        add_decade(10 ** (-(max_exponent_bits - 1) + i), 2 ** (i + non_sign_bits - max_exponent_bits + extra))
    if additional_items > 0:
        # Only reached when max_exponent_bits < total_bits - 1: extra entries in the top decade.
        add_decade(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1), additional_items)
    values += [0.0, 1.0]
    if len(values) > 2**total_bits:
        raise ValueError(f"{len(values)} code values do not fit in {total_bits} bits")
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def roundtrip_bound(code: torch.Tensor) -> float:
    """Largest |x/N - Q[q(x/N)]| over x/N in [-1, 1] (signed) or [0, 1] (unsigned):
    half the largest gap between neighbours, or the distance from the ends of
    the range to the outermost entries, whichever is larger."""
    lo = -1.0 if code[0] < 0 else 0.0
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    return max(half_gap, code[0].item() - lo, 1.0 - code[-1].item())


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[1:] + code[:-1]) / 2


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x (any shape, n values) -> (B, block_size) fp32, zero-padded to a whole block."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def n_blocks(numel: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    return math.ceil(numel / block_size)


def quantize_blockwise(
    x: torch.Tensor,
    code: torch.Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    out: torch.Tensor | None = None,
    absmax_out: torch.Tensor | None = None,
    keep_nonzero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (q uint8 shaped like x, absmax fp32 (B,)).  Writes into out/absmax_out if given.

    keep_nonzero: a non-zero value whose nearest entry is 0 takes the smallest
    entry of its sign instead (no underflow to zero; used for Adam's second
    moment, see impl/optim/adam8bit.py).  The error bound above still holds."""
    blocks = _blocks(x, block_size)  # (B, block_size)
    absmax = blocks.abs().amax(dim=1)  # (B,)
    # An all-zero block has N_b = 0; divide by 1 instead so it maps to the 0 entry.
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (blocks / scale[:, None]).clamp_(-1.0, 1.0)
    code = code.to(normed.device)
    # Nearest entry; ties go down. searchsorted(sorted, x) == bucketize(x, sorted), but faster on CPU.
    idx = torch.searchsorted(_midpoints(code), normed.reshape(-1)).view(normed.shape)
    if keep_nonzero:
        zero = int((code == 0).nonzero()[0])
        idx = torch.where((idx == zero) & (normed > 0), zero + 1, idx)
        if zero > 0:
            idx = torch.where((idx == zero) & (normed < 0), zero - 1, idx)
    q = idx.to(torch.uint8).reshape(-1)[: x.numel()].view(x.shape)
    if out is not None:
        out.copy_(q)
        q = out
    if absmax_out is not None:
        absmax_out.copy_(absmax)
        absmax = absmax_out
    return q, absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """(q uint8, absmax (B,)) -> fp32 tensor shaped like q: Q[q_j] * N_b."""
    values = code.to(q.device)[q.reshape(-1).int()]  # (n,); int32 indices gather ~3x faster than int64 on CPU
    values = _blocks(values, block_size) * absmax[:, None]  # (B, block_size)
    return values.reshape(-1)[: q.numel()].view(q.shape)
