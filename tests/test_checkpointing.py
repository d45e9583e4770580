"""Activation checkpointing: exact gradients, and the memory it saves matches the count.

Reference: the same model without checkpointing (STYLE rule 9). The prediction
is ``activation_values_per_layer`` (bench/meters/activations.py), fp32 values.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.meters.activations import activation_values_per_layer, saved_activation_bytes
from bench.meters.memory import CpuPeakTracker
from bench.workloads.train import global_batch
from impl.checkpointing import apply_activation_checkpointing, is_checkpointed
from impl.model import build_model, lm_loss, model_config

CFG = model_config("tiny")  # dim 64, 4 layers, 4 heads, ffn 192
S, B = 32, 8
FP32 = 4
# The meter and the formula count the same tensors, so they should agree to the
# byte; 1 % leaves room only for a stray small tensor (an index, a scalar).
RATIO_TOL = 0.01


def eager_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d + causal mask)·v, unfused: keeps the (B, nh, T, T) probabilities,
    the s² term selective recompute exists to remove."""
    T = q.shape[-2]
    mask = torch.full((T, T), float("-inf")).triu(1)  # additive, so no op saves it
    probs = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask, dim=-1)
    return probs @ v


def model(mode: str | None = None, every: int = 1, core=None):
    m = build_model(CFG, seed=0)
    if core is not None:  # replace the core first, then checkpoint it (plan order)
        for block in m.layers:
            block.attention.core = core
    if mode is not None:
        apply_activation_checkpointing(m, mode, every)
    return m


BATCH = global_batch(CFG, batch_size=B, seq_len=S, seed=0, step=0)


def grads(m) -> dict[str, torch.Tensor]:
    lm_loss(m(BATCH.inputs), BATCH.targets).backward()
    return {n: p.grad for n, p in m.named_parameters()}


def layer_stack_saved_bytes(m) -> int:
    """Saved bytes of the blocks alone (the input is a leaf, as the embedding output would be)."""
    x = m.tok_embeddings(BATCH.inputs).detach().requires_grad_()
    cos, sin = m.rope_cos[:S], m.rope_sin[:S]

    def layers():
        h = x
        for layer in m.layers:
            h = layer(h, cos, sin)
        return h

    return saved_activation_bytes(layers, exclude=[*m.parameters(), *m.buffers()]).saved_bytes


def per_layer_bytes(recompute: str, core: str = "fused") -> int:
    return activation_values_per_layer(CFG, S, B, recompute, attention_core=core) * FP32


@pytest.mark.parametrize("mode,every,n_wrapped", [("full", 1, 4), ("selective", 1, 4), ("full", 2, 2),
                                                  ("selective", 2, 2)])
def test_gradients_identical_and_keys_unchanged(mode, every, n_wrapped):
    ref = model()
    m = build_model(CFG, seed=0)
    assert apply_activation_checkpointing(m, mode, every) == n_wrapped
    assert list(m.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    # every=2 wraps the 2nd and 4th block (torchtitan's ac_freq convention).
    wrapped = [i for i, b in enumerate(m.layers) if is_checkpointed(b) or is_checkpointed(b.attention.core)]
    assert wrapped == list(range(every - 1, CFG.n_layers, every))
    g_ref, g = grads(ref), grads(m)
    # Recompute runs the same kernels on the same inputs: bitwise equal on CPU fp32.
    for name in g_ref:
        assert torch.equal(g[name], g_ref[name]), (name, (g[name] - g_ref[name]).abs().max().item())


def test_checkpointing_twice_is_refused():
    m = model("full")
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_activation_checkpointing(m, "selective")
    with pytest.raises(ValueError, match="mode"):
        apply_activation_checkpointing(model(), "blocks")


def test_prediction_for_this_model():
    # Tiny: h = 64, f = 3h, a = 4: 11 + 4·3 = 23 sbh, + 2·s·b (rsqrt) + a·s·b (log-sum-exp).
    sbh, sb = S * B * CFG.dim, S * B
    assert activation_values_per_layer(CFG, S, B) == 23 * sbh + 2 * sb + 4 * sb
    assert activation_values_per_layer(CFG, S, B, "full") == sbh
    assert activation_values_per_layer(CFG, S, B, "selective") == 22 * sbh + 2 * sb
    assert activation_values_per_layer(CFG, S, B, "selective", attention_core="eager") == 22 * sbh + 2 * sb
    assert activation_values_per_layer(CFG, S, B, attention_core="eager") == 22 * sbh + 2 * sb + 4 * S * S * B


@pytest.mark.parametrize("mode,every,core", [(None, 1, "fused"), ("full", 1, "fused"), ("full", 2, "fused"),
                                             ("selective", 1, "fused"), (None, 1, "eager"),
                                             ("selective", 1, "eager"), ("selective", 2, "eager")])
def test_saved_bytes_match_prediction(mode, every, core):
    m = model(mode, every, core=eager_causal_attention if core == "eager" else None)
    n_ckpt = CFG.n_layers // every if mode else 0
    predicted = (n_ckpt * per_layer_bytes(mode or "none", core)
                 + (CFG.n_layers - n_ckpt) * per_layer_bytes("none", core))
    measured = layer_stack_saved_bytes(m)
    assert abs(measured / predicted - 1) <= RATIO_TOL, (measured, predicted)


def test_full_recompute_drop_factor_on_whole_model():
    """Whole decoder + loss: embedding and head terms are the same with and without
    checkpointing, so the difference is L·(per-layer none − full) and the layer
    stack alone falls by the predicted factor (23.1× for tiny)."""
    def whole(m):
        return saved_activation_bytes(lambda: lm_loss(m(BATCH.inputs), BATCH.targets),
                                      exclude=[*m.parameters(), *m.buffers()]).saved_bytes

    none, full = whole(model()), whole(model("full"))
    predicted_diff = CFG.n_layers * (per_layer_bytes("none") - per_layer_bytes("full"))
    assert abs((none - full) / predicted_diff - 1) <= RATIO_TOL
    factor = layer_stack_saved_bytes(model()) / layer_stack_saved_bytes(model("full"))
    predicted_factor = per_layer_bytes("none") / per_layer_bytes("full")
    assert predicted_factor == pytest.approx(23.09, abs=0.01)
    assert abs(factor / predicted_factor - 1) <= RATIO_TOL


def step_peak_bytes(m, whole: bool) -> int:
    """CPU peak live-tensor bytes over one forward+backward (after a warm-up step):
    of the whole decoder + loss, or of the layer stack alone (sum of squares)."""
    x = m.tok_embeddings(BATCH.inputs).detach().requires_grad_()
    cos, sin = m.rope_cos[:S], m.rope_sin[:S]

    def step():
        if whole:
            loss = lm_loss(m(BATCH.inputs), BATCH.targets)
        else:
            h = x
            for layer in m.layers:
                h = layer(h, cos, sin)
            loss = h.square().mean()
        loss.backward()

    step()
    with CpuPeakTracker() as tracker:
        with tracker.steady():
            step()
    return tracker.peak_bytes


@pytest.mark.parametrize("whole", [False, True], ids=["layers", "whole-model"])
def test_cpu_peak_falls_with_full_recompute(whole):
    """Δ = A_none − A_full per layer. Without checkpointing the peak comes at the
    start of backward with all L layers' activations live. With full recompute:

    * layer stack alone: the peak is while a block is re-materialised in
      backward (its A_none on top of L block inputs), so the peak falls by
      ≈ (L−1)·Δ;
    * whole model: the head's backward transient (logits and their gradient,
      2·b·s·V·4 bytes = 2 MiB) exceeds one block's A_none (1.4 MiB), so the peak
      stays at the start of backward in both runs and falls by ≈ L·Δ.

    Tolerance 10 % (the other transients are common to both runs)."""
    delta = per_layer_bytes("none") - per_layer_bytes("full")
    if whole:
        assert 2 * B * S * CFG.vocab_size * FP32 > per_layer_bytes("none")  # the premise above
    none, full = step_peak_bytes(model(), whole), step_peak_bytes(model("full"), whole)
    predicted_drop = (CFG.n_layers - (0 if whole else 1)) * delta
    assert full < none
    assert abs((none - full) / predicted_drop - 1) <= 0.10, (none, full, predicted_drop)
