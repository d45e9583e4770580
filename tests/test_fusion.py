"""Every fused op against its unfused reference (outputs and gradients), and
whole models under apply_fusion("fused"/"compile") against the unfused model
over one AdamW step. Tolerance: max |fused - ref| / max |ref| per tensor,
fp32 <= 1e-5 (impl.fusion.TOLERANCE), bf16 <= 2e-2 for the eager variants.
Compiled variants run in fp32 only (each dtype is another inductor compile)."""
from __future__ import annotations

import pytest
import torch

from impl.fusion import (TOLERANCE, VARIANTS, _packed_view, apply_fusion, fused_optimizer_kwargs,
                         max_rel_error, pack_swiglu_weights, validate_fusion)
from impl.model import FeedForward, build_model, lm_loss, model_config

CFG = model_config("small")  # dim 256, ffn 768: the op shapes
TOKENS = (2, 64)  # (B, T) for correctness; benchmarks use 8 x 256
EAGER = [n for n in VARIANTS if not n.endswith("/compiled")]


def op_inputs(name: str, dtype: torch.dtype, seed: int = 0) -> tuple:
    """Leaf tensors (requires_grad) for one op family, deterministic."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(dtype).requires_grad_()

    B, T, D, Fd = *TOKENS, CFG.dim, CFG.ffn_dim
    if name.startswith("swiglu/"):
        # w1 and w3 back to back in one storage, as apply_fusion leaves them.
        w13 = torch.randn(2 * Fd, D, generator=g).mul(D**-0.5).to(dtype)
        return rand(B, T, D), w13[:Fd].requires_grad_(), w13[Fd:].requires_grad_()
    if name.startswith("add_rmsnorm/"):
        return rand(B, T, D), rand(B, T, D), rand(D, scale=0.1, offset=1.0), CFG.norm_eps
    raise KeyError(name)


def outputs_and_grads(fn, inputs: tuple) -> tuple[tuple, tuple]:
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    # A random cotangent per output, so every output's gradient path counts.
    g = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in out)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor)]
    return out, torch.autograd.grad(loss, leaves)


def assert_matches(actual: tuple, expected: tuple, tol: float, what: str) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, (what, i)
        err = max_rel_error(a, e)
        assert err <= tol, f"{what}[{i}]: max rel error {err:.3g} > {tol:g}"


# Compiled variants are checked in fp32 only (each dtype is another compile);
# the eager ones in bf16 too.
OP_CASES = [pytest.param(n, torch.float32, id=f"{n}-fp32") for n in VARIANTS if not n.startswith("adamw/")] + [
    pytest.param(n, torch.bfloat16, id=f"{n}-bf16") for n in VARIANTS if not n.startswith("adamw/") and n in EAGER]


@pytest.mark.parametrize("name, dtype", OP_CASES)
def test_fused_op_matches_reference(name, dtype):
    reference, fused = VARIANTS[name]
    inputs = op_inputs(name, dtype)
    ref_out, ref_grads = outputs_and_grads(reference, inputs)
    out, grads = outputs_and_grads(fused, inputs)
    assert_matches(out, ref_out, TOLERANCE[dtype], f"{name} output")
    assert_matches(grads, ref_grads, TOLERANCE[dtype], f"{name} grad")


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.startswith("adamw/")])
def test_optimizer_step_matches_for_loop(name):
    reference, fused = VARIANTS[name]
    g = torch.Generator().manual_seed(0)
    shapes = [(CFG.ffn_dim, CFG.dim), (CFG.dim,), (CFG.vocab_size, CFG.dim)]
    start = [torch.randn(s, generator=g) for s in shapes]

    def run(step):
        params = [p.clone() for p in start]
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        grads_g = torch.Generator().manual_seed(1)
        for _ in range(3):
            step(params, [torch.randn(p.shape, generator=grads_g) for p in params], m, v, steps)
        return params + m + v, steps

    ref_state, ref_steps = run(reference)
    state, steps = run(fused)
    assert [s.item() for s in steps] == [s.item() for s in ref_steps] == [3.0] * 3
    assert_matches(tuple(state), tuple(ref_state), TOLERANCE[torch.float32], name)
    # The update actually moved the weights (a no-op step would also "match").
    assert max_rel_error(state[0], start[0]) > 1e-4


def test_packed_swiglu_with_separate_weights_matches_reference():
    x, w1, w3 = op_inputs("swiglu/packed", torch.float32)
    w3 = w3.detach().clone().requires_grad_()  # not adjacent: the concatenating path
    ref_out, ref_grads = outputs_and_grads(VARIANTS["swiglu/packed"][0], (x, w1, w3))
    out, grads = outputs_and_grads(VARIANTS["swiglu/packed"][1], (x, w1, w3))
    assert_matches(out + grads, ref_out + ref_grads, TOLERANCE[torch.float32], "swiglu/packed separate")


def test_packed_swiglu_weights_are_a_zero_copy_view():
    ffn = FeedForward(CFG)
    before = {k: v.clone() for k, v in ffn.state_dict().items()}
    params = list(ffn.parameters())
    assert pack_swiglu_weights(ffn)
    assert list(ffn.parameters()) == params  # same Parameter objects
    assert all(torch.equal(before[k], v) for k, v in ffn.state_dict().items())
    w1, w3 = ffn.w1.weight, ffn.w3.weight
    assert _packed_view(w1, w3).data_ptr() == w1.data_ptr()
    assert w3.data_ptr() == w1.data_ptr() + w1.numel() * w1.element_size()
    # Not adjacent (e.g. after a sharding plan re-allocated one): a copy, same values.
    loose = _packed_view(w1, w3.detach().clone())
    assert loose.data_ptr() != w1.data_ptr() and torch.equal(loose, torch.cat((w1, w3)))


def test_fused_optimizer_kwargs():
    assert fused_optimizer_kwargs("none") == {"foreach": False, "fused": False}
    assert fused_optimizer_kwargs("foreach") == {"foreach": True, "fused": False}
    assert fused_optimizer_kwargs("fused")["fused"] is True
    with pytest.raises(ValueError, match="unknown"):
        fused_optimizer_kwargs("triton")


def test_apply_fusion_rejects_unknown_and_repeated_modes():
    model = build_model(model_config("tiny"), seed=0)
    with pytest.raises(ValueError, match="unknown fusion mode"):
        apply_fusion(model, "fuse")
    apply_fusion(model, "fused")
    with pytest.raises(ValueError, match="already applied"):
        apply_fusion(model, "compile")


def tokens_for(cfg, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (TOKENS[0], TOKENS[1] + 1), generator=g)


@pytest.fixture(scope="module")
def compiled_pair():
    """(compiled model, notes); compiled once for the module (tens of seconds)."""
    model = build_model(CFG, seed=0)
    return model, apply_fusion(model, "compile")


def _pair(mode, compiled_pair):
    if mode == "compile":
        return compiled_pair
    model = build_model(CFG, seed=0)
    return model, apply_fusion(model, mode)


@pytest.mark.parametrize("mode", ["fused", "compile"])
def test_model_matches_unfused_over_one_step(mode, compiled_pair):
    ref = build_model(CFG, seed=0)
    model, notes = _pair(mode, compiled_pair)
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert notes["mode"] == mode
    assert notes.get("blocks", notes.get("blocks_compiled")) == CFG.n_layers
    # validate_fusion: logits and all grads before any step, without touching .grad.
    assert validate_fusion(model, ref, tokens_for(CFG)) <= TOLERANCE[torch.float32]
    assert all(p.grad is None for p in model.parameters())

    # AdamW's first update is lr * g / (|g| + eps): per element, so a rounding-
    # level change in a small g (|g| ~ eps) moves it by up to lr * dg / (4 eps).
    # With eps = 1e-8 weights then differed by 0.03 lr and step-1 gradients by
    # 3e-4; eps = 1e-6 brings that to 0.007 lr and 2e-5 (fused, measured).
    lr, eps = 1e-3, 1e-6
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, eps=eps, **fused_optimizer_kwargs(k))
            for m, k in ((ref, "none"), (model, mode))]
    for step in range(2):
        losses = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            loss = lm_loss(m(tokens_for(CFG, step)[:, :-1]), tokens_for(CFG, step)[:, 1:])
            loss.backward()
            losses.append(loss.item())
            if step == 0:
                opt.step()
        # step 1 compares loss and gradients after one optimizer step.
        assert losses[1] == pytest.approx(losses[0], rel=TOLERANCE[torch.float32])
        for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
            assert max_rel_error(p.grad, p_ref.grad) <= (1e-5, 1e-4)[step], (step, name)
            assert (p.detach() - p_ref.detach()).abs().max().item() <= 0.05 * lr, (step, name)


def test_validate_fusion_rejects_a_broken_fusion():
    ref, model = build_model(CFG, seed=0), build_model(CFG, seed=0)
    apply_fusion(model, "fused")
    model.layers[2].ffn_norm.eps = 1e-1  # a wrong constant inside the fused op
    with pytest.raises(ValueError, match="differs from reference"):
        validate_fusion(model, ref, tokens_for(CFG))
    with torch.no_grad():
        model.layers[0].feed_forward.w1.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="different weights"):
        validate_fusion(model, ref, tokens_for(CFG))


def saved_activation_bytes(fn, inputs: tuple) -> int:
    """Bytes autograd keeps for backward, counting each storage once and
    leaving out the inputs themselves (weights and x are held anyway)."""
    held = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in held:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["swiglu/packed", "add_rmsnorm/function"])
def test_fused_function_saves_fewer_activations(name):
    reference, fused = VARIANTS[name]
    inputs = op_inputs(name, torch.float32)
    B, T = TOKENS
    ref_bytes, fused_bytes = saved_activation_bytes(reference, inputs), saved_activation_bytes(fused, inputs)
    # swiglu: reference keeps a, b and silu(a) (3 x N*F), packed keeps h = [a|b] (2 x N*F);
    # add_rmsnorm: reference keeps h, rstd and h * rstd; the Function keeps h and rstd (measured).
    per_row = {"swiglu/packed": CFG.ffn_dim, "add_rmsnorm/function": CFG.dim}[name] * 4 * B * T
    assert fused_bytes <= ref_bytes - per_row, (ref_bytes, fused_bytes)
