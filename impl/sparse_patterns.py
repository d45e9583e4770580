"""Sparse-attention patterns as block layouts (numpy only: no torch, so the
harness and FLOPs accounting can read a pattern's density without it).

A sequence of T tokens is cut into nb = T / block blocks; a layout is an
(nb, nb) boolean array, ``layout[i, j]`` = query block i attends key block j.
The engines (``impl.sparse_attention``) compute exactly these blocks; in a
causal layout the diagonal blocks are additionally masked token by token
(key position <= query position). Every row holds its diagonal block, so no
token has an empty softmax.

Patterns (all sizes in blocks):

* ``sliding_window`` — band: |i − j| <= window (causal: 0 <= i − j <= window).
  Longformer's local attention / Child et al.'s "strided" local part.
* ``dilated`` — the band's 2·window + 1 blocks spread over a d× wider field:
  key blocks at distances 0, d, 2d, …, window·d (Longformer §3.1, at block
  granularity).
* ``global`` — the first ``global_blocks`` blocks attend to, and are attended
  by, every block (plus each block's own diagonal).
* ``random`` — ``random_blocks`` key blocks per query row drawn with a seeded
  generator (BigBird's random attention), plus the diagonal.
* ``block_local`` — non-overlapping chunks of window + 1 blocks attend only
  inside their chunk (Parmar et al. 2018 local 1D attention).
* ``longformer`` = sliding_window ∪ global (Beltagy et al. 2020).
* ``bigbird`` = sliding_window ∪ global ∪ random (Zaheer et al. 2020, ITC).
* ``dense`` — every block (causal: the lower triangle).

Defaults follow BigBird-ITC at block 64: window 1 (three blocks: left, self,
right), one global block, two random blocks, dilation 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

PatternKind = Literal[
    "dense", "sliding_window", "dilated", "global", "random", "block_local", "longformer", "bigbird"
]
KINDS: tuple[str, ...] = PatternKind.__args__  # type: ignore[attr-defined]


@dataclass(kw_only=True, frozen=True, slots=True)
class SparsePattern:
    kind: PatternKind
    """Which layout (see the module docstring)."""
    block: int = 64
    """Tokens per block: the unit the engines skip or compute."""
    window: int = 1
    """Band half-width in blocks (causal: blocks to the left); block_local chunks are window + 1 blocks."""
    dilation: int = 2
    """Stride between attended blocks of the dilated window."""
    global_blocks: int = 1
    """Leading blocks that attend to and are attended by all blocks."""
    random_blocks: int = 2
    """Random key blocks per query block row."""
    causal: bool = True
    seed: int = 0
    """Seeds the random blocks: the same pattern always gives the same layout."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind = {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("block", "dilation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        for name in ("window", "global_blocks", "random_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 0")

    def n_blocks(self, seq_len: int) -> int:
        if seq_len % self.block:
            raise ValueError(f"seq_len = {seq_len} is not a multiple of the attention block = {self.block}")
        return seq_len // self.block


def block_layout(pattern: SparsePattern, seq_len: int) -> np.ndarray:
    """(nb, nb) bool: which key blocks each query block computes."""
    nb = pattern.n_blocks(seq_len)
    kind = pattern.kind
    parts = {
        "dense": ("dense",), "sliding_window": ("band",), "dilated": ("dilated",), "global": ("global",),
        "random": ("random",), "block_local": ("local",), "longformer": ("band", "global"),
        "bigbird": ("band", "global", "random"),
    }[kind]
    layout = np.eye(nb, dtype=bool)
    for part in parts:
        layout |= _PARTS[part](pattern, nb)
    if pattern.causal:
        layout &= np.tri(nb, dtype=bool)
    return layout


def _dense(p: SparsePattern, nb: int) -> np.ndarray:
    return np.ones((nb, nb), dtype=bool)


def _offsets(nb: int) -> np.ndarray:
    """i − j for every (query block i, key block j)."""
    i = np.arange(nb)
    return i[:, None] - i[None, :]


def _band(p: SparsePattern, nb: int) -> np.ndarray:
    return np.abs(_offsets(nb)) <= p.window


def _dilated(p: SparsePattern, nb: int) -> np.ndarray:
    d = _offsets(nb)
    return (np.abs(d) <= p.window * p.dilation) & (d % p.dilation == 0)


def _global(p: SparsePattern, nb: int) -> np.ndarray:
    g = min(p.global_blocks, nb)
    out = np.zeros((nb, nb), dtype=bool)
    out[:g, :] = True
    out[:, :g] = True
    return out


def _random(p: SparsePattern, nb: int) -> np.ndarray:
    """``random_blocks`` distinct key blocks per row, drawn (without the diagonal)
    from the row's admissible blocks (causal: j < i)."""
    rng = np.random.default_rng(p.seed)
    out = np.zeros((nb, nb), dtype=bool)
    for i in range(nb):
        candidates = np.array([j for j in range(i if p.causal else nb) if j != i], dtype=np.int64)
        take = min(p.random_blocks, len(candidates))
        if take:
            out[i, rng.choice(candidates, size=take, replace=False)] = True
    return out


def _local(p: SparsePattern, nb: int) -> np.ndarray:
    chunk = np.arange(nb) // (p.window + 1)
    return chunk[:, None] == chunk[None, :]


_PARTS = {"dense": _dense, "band": _band, "dilated": _dilated, "global": _global, "random": _random,
          "local": _local}


def density(pattern: SparsePattern, seq_len: int) -> float:
    """Computed blocks ÷ all nb² blocks. The FLOPs formula's attention term
    (12·L·H·d_head·S, full S², PaLM App. B) is multiplied by this, so a sparse
    cell's MFU counts only blocks that are computed. Dense is 1 by that
    convention even when causal (no causal discount)."""
    if pattern.kind == "dense":
        return 1.0
    layout = block_layout(pattern, seq_len)
    return float(layout.sum()) / layout.size


def band_width(layout: np.ndarray) -> int:
    """Largest |i − j| over computed blocks (the layout's bandwidth, in blocks)."""
    i, j = np.nonzero(layout)
    return int(np.abs(i - j).max()) if len(i) else 0
