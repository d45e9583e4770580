"""Sparse attention: layouts, and both engines against the dense masked SDPA reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from impl.model import build_model, lm_loss, model_config
from impl.sparse_attention import (
    SparseAttentionCore, apply_sparse_attention, block_gather_attention, dense_masked_attention, flex_block_mask,
    flex_sparse_attention, gather_plan, token_mask,
)
from impl.sparse_patterns import KINDS, SparsePattern, band_width, block_layout, density

T, BLOCK = 128, 16  # 8 blocks
NB = T // BLOCK
CASES = [(kind, causal) for kind in KINDS for causal in (True, False)]


def _qkv(seed: int = 0, shape=(2, 2, T, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, requires_grad=True) for _ in range(3)]


def _pattern(kind: str, causal: bool, **kw) -> SparsePattern:
    return SparsePattern(kind=kind, block=BLOCK, causal=causal, **kw)


@pytest.mark.parametrize("kind,causal", CASES)
def test_block_gather_matches_masked_dense(kind, causal):
    pattern = _pattern(kind, causal)
    q, k, v = _qkv()
    out = block_gather_attention(q, k, v, gather_plan(pattern, T))
    ref = dense_masked_attention(q, k, v, pattern)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [True, False])
def test_flex_forward_matches_masked_dense(causal):
    """Compiled flex_attention with the BlockMask, every pattern (one compile
    per causality: layouts are tensors, not recompiles). Forward only: torch
    2.13 has no flex backward on CPU (next test)."""
    for kind in KINDS:
        pattern = _pattern(kind, causal)
        q, k, v = (x.detach() for x in _qkv(1))
        with torch.no_grad():
            out = flex_sparse_attention(q, k, v, flex_block_mask(pattern, T))
        torch.testing.assert_close(out, dense_masked_attention(q, k, v, pattern), rtol=0, atol=1e-5,
                                   msg=lambda m: f"{kind}: {m}")


def test_flex_block_mask_holds_exactly_the_layout():
    pattern = _pattern("bigbird", True)
    bm = flex_block_mask(pattern, T)
    dense_blocks = bm.to_dense()[0, 0].bool()  # (nb, nb): partial or full
    assert np.array_equal(dense_blocks.numpy(), block_layout(pattern, T))
    assert int(bm.kv_num_blocks.sum()) == NB  # causal: only the diagonal blocks are partial


def test_flex_refuses_cpu_backward_with_the_reason():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="no backward on CPU.*block_gather"):
        flex_sparse_attention(q, k, v, flex_block_mask(_pattern("sliding_window", True), T))


@pytest.mark.gpu  # flex_attention backward needs CUDA in torch 2.13; scripts/gpu_check.sh runs it
def test_flex_gradients_match_masked_dense_cuda():
    """The GPU path (compiled flex forward + backward), every pattern; fp32 (the
    kernel may use TF32 unless disabled, hence the precision setting)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for kind, causal in CASES:
        pattern = _pattern(kind, causal)
        q, k, v = (x.detach().cuda().requires_grad_() for x in _qkv())
        out = SparseAttentionCore(pattern, "flex")(q, k, v)
        ref = dense_masked_attention(q, k, v, pattern)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, msg=lambda m: f"{kind} causal={causal}: {m}")
        for name, g, r in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-5, msg=lambda m: f"{kind} causal={causal} d{name}: {m}")


# ---------------------------------------------------------------- layouts

def _nonzero_offsets(layout: np.ndarray) -> set[int]:
    i, j = np.nonzero(layout)
    return set((i - j).tolist())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [0, 1, 3])
def test_band_width_and_density(window, causal):
    layout = block_layout(_pattern("sliding_window", causal, window=window), T)
    assert band_width(layout) == window
    w = min(window, NB - 1)
    blocks = NB * (w + 1) - w * (w + 1) // 2  # lower half of the band incl. diagonal
    if not causal:
        blocks = 2 * blocks - NB
    assert layout.sum() == blocks
    assert density(_pattern("sliding_window", causal, window=window), T) == blocks / NB**2


def test_band_density_falls_as_one_over_length():
    """Fixed window: computed blocks grow ∝ T, so density ∝ 1/T (→ O(T) work)."""
    p = SparsePattern(kind="sliding_window", block=64, window=1)
    counts = [block_layout(p, t).sum() for t in (1024, 2048, 4096, 8192)]
    assert [c2 - 2 * c1 for c1, c2 in zip(counts, counts[1:])] == [1, 1, 1]  # 2·nb − 1 blocks
    assert [density(p, t) for t in (1024, 8192)] == [(2 * nb - 1) / nb**2 for nb in (16, 128)]


def test_layout_shapes_of_each_family():
    nb = NB
    causal_all = [block_layout(_pattern(k, True), T) for k in KINDS]
    for layout in causal_all:  # causal: lower triangular, diagonal always present
        assert not np.triu(layout, 1).any() and layout.diagonal().all()
    dil = block_layout(_pattern("dilated", False, window=2, dilation=3), T)
    assert _nonzero_offsets(dil) == {-6, -3, 0, 3, 6}
    glob = block_layout(_pattern("global", False, global_blocks=2), T)
    assert glob[:2].all() and glob[:, :2].all() and glob[2:, 2:].sum() == nb - 2
    local = block_layout(_pattern("block_local", False, window=1), T)  # chunks of 2 blocks
    assert local.sum() == 2 * nb and local[0, 1] and not local[1, 2]
    rnd = block_layout(_pattern("random", False, random_blocks=3), T)
    assert (rnd.sum(1) == 4).all()  # 3 random + the diagonal per row
    band, g = block_layout(_pattern("sliding_window", False), T), block_layout(_pattern("global", False), T)
    assert np.array_equal(block_layout(_pattern("longformer", False), T), band | g)
    bigbird = block_layout(_pattern("bigbird", False), T)
    assert np.array_equal(bigbird, band | g | block_layout(_pattern("random", False), T))
    assert block_layout(_pattern("dense", True), T).sum() == nb * (nb + 1) // 2


def test_random_blocks_are_seeded():
    a, b = (block_layout(_pattern("random", False, seed=s), T) for s in (0, 0))
    c = block_layout(_pattern("random", False, seed=1), T)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_sizes_name_the_field():
    with pytest.raises(ValueError, match="seq_len = 100 is not a multiple of the attention block = 16"):
        block_layout(_pattern("sliding_window", True), 100)
    with pytest.raises(ValueError, match="dilation = 0"):
        _pattern("dilated", True, dilation=0)
    mask = token_mask(_pattern("sliding_window", True), T)
    assert mask.shape == (T, T) and not mask.triu(1).any()


# ---------------------------------------------------------------- in the model

def test_sparse_core_in_the_decoder_equals_dense_masked_core():
    """The same tiny decoder with the block-gather core and with a dense masked
    SDPA core: equal loss and parameter gradients."""
    pattern = SparsePattern(kind="bigbird", block=BLOCK)
    cfg = model_config("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(0))
    sparse, ref = build_model(cfg, 0), build_model(cfg, 0)
    notes = apply_sparse_attention(sparse, pattern, seq_len=T)
    for block in ref.layers:
        block.attention.core = lambda q, k, v: dense_masked_attention(q, k, v, pattern)
    losses = []
    for m in (sparse, ref):
        loss = lm_loss(m(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-5)
    for (name, a), b in zip(sparse.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert notes["density"] == density(pattern, T) < 1 and notes["engine"] == "block_gather"
