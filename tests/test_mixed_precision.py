"""Mixed precision: fp16/bf16 + fp32 master weights track fp32 training; the loss
scaler skips overflowing steps and matches DeepSpeed's state machine; state bytes
are 2Ψ + 2Ψ + 12Ψ (ZeRO paper, K = 12)."""
from __future__ import annotations

import contextlib
import random

import pytest
import torch

from bench import theory
from bench.meters.memory import model_state_bytes
from bench.workloads.train import global_batch, torch_optimizer
from impl.mixed_precision import DynamicLossScaler, MasterWeightOptimizer, autocast_context
from impl.model import build_model, lm_loss, model_config, total_params

CFG = model_config("tiny")
BATCH_SIZE, SEQ_LEN = 8, 32


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model is dispatch-bound; on the shared 2-core machines two intra-op
    # threads under load made steps 10–50× slower (25 ms vs 0.2–1.8 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batch(step: int):
    return global_batch(CFG, batch_size=BATCH_SIZE, seq_len=SEQ_LEN, seed=0, step=step)


def adamw(params):
    return torch_optimizer("adamw", params)


def train_fp32(steps: int, precision: str = "fp32") -> list[float]:
    model = build_model(CFG, seed=0)
    opt = adamw(model.parameters())
    losses = []
    for step in range(steps):
        b = batch(step)
        with autocast_context(precision, "cpu"):
            loss = lm_loss(model(b.inputs), b.targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def train_master(steps: int, dtype: torch.dtype, scaler: DynamicLossScaler | None = None):
    model = build_model(CFG, seed=0)
    opt = MasterWeightOptimizer.from_fp32_model(model, dtype, adamw, scaler=scaler)
    losses = []
    for step in range(steps):
        b = batch(step)
        loss = lm_loss(model(b.inputs), b.targets)
        opt.scale(loss).backward()
        assert opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model, opt


@pytest.mark.parametrize("dtype,observed", [(torch.float16, 3.5e-5), (torch.bfloat16, 2.0e-4)])
def test_master_weights_track_fp32_every_step(dtype, observed):
    """50 AdamW steps; the loss at *every* step within 1 % of fp32 (the brief's bar).
    Measured 2026-11-28: max relative gap 3.5e-5 (fp16, scale 2¹⁶, no overflow)
    and 2.0e-4 (bf16, no scaling); also asserted within 5× of that, so a
    regression to 'merely 1 %' is caught."""
    ref = train_fp32(50)
    losses, model, opt = train_master(50, dtype)
    gaps = [abs(a - r) / r for a, r in zip(losses, ref)]
    assert max(gaps) <= 0.01
    assert max(gaps) <= 5 * observed, max(gaps)
    assert ref[-1] < ref[0] - 0.3  # it learned something, so the comparison means something
    assert all(p.dtype == dtype for p in model.parameters())
    assert opt.skipped_steps == 0
    assert opt.scaler.enabled == (dtype == torch.float16)


def test_bf16_autocast_tracks_fp32():
    ref, bf16 = train_fp32(10), train_fp32(10, "bf16")
    assert max(abs(a - r) / r for a, r in zip(bf16, ref)) <= 0.01
    assert bf16 != ref  # autocast really ran in bf16
    assert isinstance(autocast_context("fp32"), contextlib.nullcontext)
    assert isinstance(autocast_context("fp16"), contextlib.nullcontext)
    with pytest.raises(ValueError):
        autocast_context("fp8")


def test_injected_overflow_skips_step_and_backs_off_after_hysteresis():
    model = build_model(CFG, seed=0)
    scaler = DynamicLossScaler(init_scale=2.0**16, growth_interval=3, hysteresis=2)
    opt = MasterWeightOptimizer.from_fp32_model(model, torch.float16, adamw, scaler=scaler)
    scales, applied = [], []
    for step in range(8):
        b = batch(step)
        opt.scale(lm_loss(model(b.inputs), b.targets)).backward()
        before = [p.detach().clone() for p in model.parameters()]
        masters_before = [m.detach().clone() for m in opt.masters]
        if step < 2:  # an overflow in one gradient (inf, then NaN)
            model.layers[1].feed_forward.w2.weight.grad[0, 0] = float("inf") if step == 0 else float("nan")
        applied.append(opt.step())
        scales.append(opt.scaler.loss_scale)
        if step < 2:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # bitwise
            assert all(torch.equal(m, q) for m, q in zip(opt.masters, masters_before))
            assert all(p.grad is None for p in model.parameters())
            assert not opt.inner.state  # the inner optimizer never saw the step
        assert all(torch.isfinite(p).all() for p in (*model.parameters(), *opt.masters))
        opt.zero_grad()
    assert applied == [False, False, True, True, True, True, True, True]
    assert opt.skipped_steps == 2
    # 1st overflow spends the hysteresis budget, 2nd halves S; the first growth
    # comes on the 4th (growth_interval + 1) clean step after the last overflow.
    assert scales == [2.0**16, 2.0**15, 2.0**15, 2.0**15, 2.0**15, 2.0**16, 2.0**16, 2.0**16]


def test_unscale_is_exact_and_refuses_16_bit_grads():
    scaler = DynamicLossScaler(init_scale=1024.0)
    g = [torch.tensor([1024.0, -2048.0]), torch.tensor([3.0 * 1024])]
    assert scaler.unscale_and_check(g) is False
    assert torch.equal(g[0], torch.tensor([1.0, -2.0])) and torch.equal(g[1], torch.tensor([3.0]))
    assert scaler.unscale_and_check([torch.tensor([1.0, float("nan")])]) is True
    with pytest.raises(TypeError, match="fp32"):
        scaler.unscale_and_check([torch.ones(2, dtype=torch.float16)])


def overflow_pattern(seed: int = 0, n: int = 120) -> list[bool]:
    """Random overflows (p = 0.25), a clean stretch long enough to grow twice, and
    a run of 40 overflows that drives S to min_scale."""
    rng = random.Random(seed)
    return [rng.random() < 0.25 for _ in range(n)] + [False] * 10 + [True] * 40 + [False] * 5


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
@pytest.mark.parametrize("consecutive", [False, True])
def test_scale_sequence_matches_deepspeed(monkeypatch, hysteresis, consecutive):
    import deepspeed.runtime.fp16.loss_scaler as ds
    # DeepSpeed only logs through dist.get_rank(); no process group here.
    monkeypatch.setattr(ds, "dist", type("_Rank0", (), {"get_rank": staticmethod(lambda: 0)}))
    kw = dict(init_scale=2.0**8, min_scale=1.0)
    theirs = ds.DynamicLossScaler(scale_window=3, delayed_shift=hysteresis, consecutive_hysteresis=consecutive,
                                  raise_error_at_min_scale=False, **kw)
    ours = DynamicLossScaler(growth_interval=3, hysteresis=hysteresis, consecutive_hysteresis=consecutive, **kw)
    seq_theirs, seq_ours = [], []
    for overflow in overflow_pattern():
        theirs.update_scale(overflow)
        ours.update(overflow)
        seq_theirs.append((theirs.cur_scale, theirs.cur_hysteresis))
        seq_ours.append((ours.loss_scale, ours.hysteresis_left))
    assert seq_ours == seq_theirs
    assert min(s for s, _ in seq_ours) == 1.0  # the pattern reached min_scale
    assert len({s for s, _ in seq_ours}) > 4  # and moved both ways


def test_hysteresis_is_not_refilled_by_clean_steps_by_default():
    """DeepSpeed's default: overflow, clean, overflow → S halves (budget 2 spent);
    with consecutive_hysteresis the clean step refills it and S holds."""
    for consecutive, expected in ((False, 2.0**15), (True, 2.0**16)):
        s = DynamicLossScaler(hysteresis=2, consecutive_hysteresis=consecutive)
        for overflow in (True, False, True):
            s.update(overflow)
        assert s.loss_scale == expected


def test_state_bytes_2_2_12():
    _, model, opt = train_master(1, torch.float16)
    b = batch(1)
    opt.scale(lm_loss(model(b.inputs), b.targets)).backward()  # grads present, as mid-step
    psi = total_params(CFG)
    n_tensors = len(opt.params)
    measured = model_state_bytes(opt.state_tensors())
    assert measured["params"] == 2 * psi
    assert measured["grads"] == 2 * psi  # fp32 master grads are freed after step()
    # fp32 master 4Ψ + Adam exp_avg 4Ψ + exp_avg_sq 4Ψ, plus AdamW's fp32 `step` scalar per tensor.
    assert measured["optimizer"] == 12 * psi + 4 * n_tensors
    predicted = theory.model_state_bytes(psi, zero=0, dp=1, precision="fp16", optimizer="adamw")
    for kind in ("params", "grads", "optimizer"):
        assert measured[kind] / predicted[kind] == pytest.approx(1.0, abs=1e-3)


def test_rejects_fp32_model():
    with pytest.raises(ValueError, match="fp16 or bf16"):
        MasterWeightOptimizer(build_model(CFG, seed=0), adamw)
