"""In-house Adafactor, LAMB and LARS against their references, on the tiny decoder.

Each comparison trains two copies of the same model (same seed, same batches):
the reference copy computes the gradient, the in-house copy receives a clone of
it, both optimizers step, and every parameter is compared after every step.
Errors are max|ours − ref| / max|ref| per tensor, the worst tensor reported.
Colossal-AI's optimizer files are loaded on their own (they only import
torch): importing `colossalai` runs the package __init__, ~10 s on this box.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from bench.workloads.train import global_batch, optimizer_spec
from impl.model import build_model, lm_loss, model_config
from impl.optim.adafactor import Adafactor, state_numel_bound
from impl.optim.lamb import Lamb
from impl.optim.lars import Lars
from impl.optim.param_groups import trust_ratio_groups

CFG = model_config("tiny")
BATCH, SEQ, SEED = 4, 16, 0  # small: the box is shared, keep the file well under 30 s


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a shared 2-core
    box OpenMP spin-waiting makes this file ~10x slower (9 s vs 100 s measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def colossal_optimizer(name: str):
    """colossalai/nn/optimizer/<name>.py as a standalone module (no package import)."""
    spec = importlib.util.find_spec("colossalai")
    assert spec is not None, "colossalai is not installed (make setup installs it)"
    path = Path(spec.submodule_search_locations[0]) / "nn" / "optimizer" / f"{name}.py"
    mod_spec = importlib.util.spec_from_file_location(f"_colossal_ref_{name}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def backward(model: torch.nn.Module, step: int) -> float:
    b = global_batch(CFG, batch_size=BATCH, seq_len=SEQ, seed=SEED, step=step)
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model(b.inputs), b.targets)
    loss.backward()
    return loss.item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensor state the optimizer holds (step counters excluded)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for k, v in s.items() if torch.is_tensor(v) and k != "step")


def lockstep(make_ours, make_refs, steps: int) -> tuple[list[float], float]:
    """Per-step worst relative error ours-vs-reference, and how far the reference
    moved from its initial weights (largest per-tensor relative change), so a
    tolerance is never met by two optimizers that both did nothing."""
    ours_model, ref_model = build_model(CFG, SEED), build_model(CFG, SEED)
    init = [p.detach().clone() for p in ref_model.parameters()]
    ours, refs = make_ours(ours_model), make_refs(ref_model)
    errors = []
    for step in range(steps):
        backward(ref_model, step)
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            p.grad = q.grad.clone()
        ours.step()
        for ref in refs:
            ref.step()
        errors.append(max(rel_err(p, q) for p, q in zip(ours_model.parameters(), ref_model.parameters())))
    moved = max(rel_err(q.detach(), p0) for q, p0 in zip(ref_model.parameters(), init))
    return errors, moved


# ---- Adafactor ---------------------------------------------------------------

def test_adafactor_like_torch_matches_torch_adafactor():
    """Same fp32 ops in the same order as torch's single-tensor path, so the
    only room for difference is reduction order inside a kernel: tolerance
    1e-6 relative (~8 fp32 ulps), over 10 steps of the workload's settings.
    (Measured: bitwise equal, error 0, also for 3-D tensors.)"""
    _, kwargs = optimizer_spec("adafactor")  # what the benchmark trains with
    kwargs = {**kwargs, "lr": 1e-2}  # larger cap so 15 steps move the weights visibly
    errors, moved = lockstep(lambda m: Adafactor.like_torch(m.parameters(), **kwargs),
                             lambda m: [torch.optim.Adafactor(m.parameters(), **kwargs)], steps=10)
    print(f"adafactor vs torch: max rel err {max(errors):.3g}, reference moved {moved:.3g}")
    assert moved > 1e-2
    assert max(errors) <= 1e-6, errors


def test_adafactor_paper_mode_reduces_loss():
    """Relative step ρ_t = min(1e-2, 1/sqrt(t)), parameter scaling, ε1 = 1e-30
    inside the averages, d = 1, no first moment. With init std 0.02 the matrices
    move by only ~2e-4 per step, so the loss falls slowly; it is measured on a
    fixed held-out batch (deterministic: no batch-to-batch noise) and must drop
    by > 0.02 from ~log V = 6.93 in 40 steps (it drops 0.04; without the
    optimizer step it would not move at all)."""
    held_out = global_batch(CFG, batch_size=16, seq_len=SEQ, seed=SEED + 1, step=0)
    model = build_model(CFG, SEED)

    def loss() -> float:
        with torch.no_grad():
            return lm_loss(model(held_out.inputs), held_out.targets).item()

    before = loss()
    opt = Adafactor(model.parameters())  # every default is the paper's
    for step in range(40):
        backward(model, step)
        opt.step()
    after = loss()
    print(f"adafactor paper mode: held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.02


def test_adafactor_first_moment_with_beta1_zero_is_the_plain_update():
    """M_t = β1 M + (1 − β1) Û_t with β1 = 0 is Û_t itself, so the first-moment
    path must reproduce the no-first-moment path (matrix and vector) up to the
    rounding of lerp(·, ·, 1) and of dividing by the clip before scaling by α_t:
    a few fp32 ulps, so rtol 1e-6."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(12, 7), (7,)]
    a = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    b = [x.detach().clone().requires_grad_() for x in a]
    init = [x.detach().clone() for x in a]
    opt_a, opt_b = Adafactor(a, weight_decay=0.01), Adafactor(b, beta1=0.0, weight_decay=0.01)
    for _ in range(5):
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=gen)
            y.grad = x.grad.clone()
        opt_a.step()
        opt_b.step()
    for x, y, x0 in zip(a, b, init):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
        assert rel_err(y.detach(), x0) > 1e-3  # both moved: the equality is not vacuous


def test_adafactor_state_is_factored():
    """Per (n, m) matrix the state holds n + m floats, per vector n; the same
    as torch's Adafactor, and the whole model's state is a tiny fraction of
    AdamW's 2·numel. A first moment (beta1) adds exactly numel per tensor."""
    model = build_model(CFG, SEED)
    backward(model, 0)
    ours, ours_m = Adafactor(model.parameters()), Adafactor(model.parameters(), beta1=0.9)
    ref = torch.optim.Adafactor(model.parameters())
    for opt in (ours, ours_m, ref):
        opt.step()  # the weights drift; only the state shapes matter here
    params = list(model.parameters())
    for p in params:
        held = sum(v.numel() for k, v in ours.state[p].items() if torch.is_tensor(v) and k != "step")
        expected = p.shape[0] + p.shape[1] if p.dim() == 2 else p.numel()
        assert held == expected == state_numel_bound(p.shape), (p.shape, held)
    numel = sum(p.numel() for p in params)
    assert state_bytes(ours) == state_bytes(ref) == 4 * sum(state_numel_bound(p.shape) for p in params)
    assert state_bytes(ours_m) == state_bytes(ours) + 4 * numel
    ratio = state_bytes(ours) / (2 * 4 * numel)
    print(f"adafactor state: {state_bytes(ours)} B = {ratio:.2%} of AdamW's")
    assert ratio < 0.02


# ---- LAMB and LARS vs Colossal-AI -------------------------------------------

@pytest.mark.parametrize("colossal_bc, ours_bc", [(False, "none"), (True, "lr")])
def test_lamb_matches_colossal(colossal_bc, ours_bc):
    """Colossal's Lamb has one optimizer-wide `adam` flag, so its side is two
    optimizers on the helper's two groups: adam=False (trust ratio) for the
    matrices, adam=True (ratio 1) for the 1-D group. 20 steps, 1e-5 relative."""
    ColossalLamb = colossal_optimizer("lamb").Lamb
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6)

    def refs(model):
        matrices, vectors = trust_ratio_groups(model, weight_decay=0.1)
        return [ColossalLamb([matrices], weight_decay=0.1, adam=False, bias_correction=colossal_bc, **hp),
                ColossalLamb([vectors], weight_decay=0.0, adam=True, bias_correction=colossal_bc, **hp)]

    errors, moved = lockstep(lambda m: Lamb(trust_ratio_groups(m, 0.1), bias_correction=ours_bc, **hp), refs, 20)
    print(f"lamb vs colossal (bias_correction={colossal_bc}): max rel err {max(errors):.3g}, moved {moved:.3g}")
    assert moved > 5e-2
    assert max(errors) <= 1e-5, errors


def test_lars_matches_colossal():
    """Colossal's Lars honours a per-group `lars` flag (False also drops weight
    decay, which the helper's 1-D group has at 0 anyway). 20 steps, 1e-5 relative."""
    ColossalLars = colossal_optimizer("lars").Lars
    hp = dict(lr=2.0, momentum=0.9, eeta=1e-3, weight_decay=1e-4, epsilon=1e-8)

    def refs(model):
        groups = [{**g, "lars": g["trust_ratio"]} for g in trust_ratio_groups(model, hp["weight_decay"])]
        return [ColossalLars(groups, **hp)]

    errors, moved = lockstep(lambda m: Lars.like_colossal(trust_ratio_groups(m, hp["weight_decay"]), **hp),
                             refs, 20)
    print(f"lars vs colossal: max rel err {max(errors):.3g}, moved {moved:.3g}")
    assert moved > 1e-2
    assert max(errors) <= 1e-5, errors


# ---- 1-D exclusion -----------------------------------------------------------

def test_param_groups_split_matrices_from_vectors():
    model = build_model(CFG, SEED)
    matrices, vectors = trust_ratio_groups(model, weight_decay=0.1)
    assert (matrices["weight_decay"], matrices["trust_ratio"]) == (0.1, True)
    assert (vectors["weight_decay"], vectors["trust_ratio"]) == (0.0, False)
    assert all(p.dim() >= 2 for p in matrices["params"]) and all(p.dim() == 1 for p in vectors["params"])
    assert len(matrices["params"]) + len(vectors["params"]) == len(list(model.parameters()))
    assert len(vectors["params"]) == 2 * CFG.n_layers + 1  # two RMSNorm gains per block + the final norm
    assert all(n.endswith("norm.weight") for n in vectors["names"])


@pytest.mark.parametrize("which", ["lamb", "lars"])
def test_one_d_params_get_neither_trust_ratio_nor_decay(which):
    """1-D group: the step must equal torch's Adam (LAMB, bias-corrected moments)
    or SGD with momentum (paper LARS) with no weight decay — with decay 0.1 on a
    gain of 1 the difference would be ~lr·0.1 per step. Matrix group: the first
    step must have exactly the trust-ratio norm, ‖Δw‖ = lr·‖w‖ (LAMB) or
    lr·η‖w‖·‖g + βw‖/(‖g‖ + β‖w‖) (LARS, decay inside d)."""
    wd = 0.1
    lr = 1e-2 if which == "lamb" else 1.0  # LARS moves a matrix by lr·η‖w‖: keep it above fp32 noise
    model, twin = build_model(CFG, SEED), build_model(CFG, SEED)
    groups = trust_ratio_groups(model, wd)
    twin_vectors = [p for p in twin.parameters() if p.dim() == 1]
    if which == "lamb":
        ours = Lamb(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, bias_correction="moments")
        ref = torch.optim.Adam(twin_vectors, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    else:
        ours = Lars(groups, lr=lr, momentum=0.9, eta=1e-3, weight_decay=wd)
        ref = torch.optim.SGD(twin_vectors, lr=lr, momentum=0.9)
    for step in range(5):
        backward(model, step)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        before = [p.detach().clone() for p in groups[0]["params"]]
        grads = [p.grad.clone() for p in groups[0]["params"]]
        ours.step()
        ref.step()
        if step == 0:
            for w, g, p in zip(before, grads, groups[0]["params"]):
                if which == "lamb":
                    expected = lr * w.norm()
                else:
                    expected = lr * 1e-3 * w.norm() * (g + wd * w).norm() / (g.norm() + wd * w.norm())
                torch.testing.assert_close((p.detach() - w).norm(), expected, rtol=1e-4, atol=0)
    err = max(rel_err(p.detach(), q.detach()) for p, q in zip(groups[1]["params"], twin_vectors))
    moved = max(rel_err(p.detach(), torch.ones_like(p)) for p in groups[1]["params"])
    print(f"{which} 1-D group vs torch: max rel err {err:.3g}, gains moved {moved:.3g}")
    assert moved > 1e-3
    assert err <= 1e-6
