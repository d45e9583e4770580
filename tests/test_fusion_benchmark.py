"""pytest-benchmark timings of every fused op against its unfused reference,
in one run: small-preset dims (D 256, F 768), 8 x 256 tokens, fp32 on CPU.
Differentiable ops are timed forward + backward (what a train step pays);
AdamW is one step over all parameters of the small model; ``block`` is one
Decoder Block eager / apply_fusion("fused") / apply_fusion("compile").
Compilation happens in a fixture (its seconds go to extra_info["compile_s"]),
and each benchmark checks the result it timed against the reference.
``time_vs_reference`` (fused / unfused median) goes into extra_info and is
printed; no absolute time is asserted.

Threads: 1 by default (FUSION_BENCH_THREADS overrides). On a shared 2-core
box, two intra-op threads stall whenever a neighbour takes a core: the same
AdamW step then varied 16 ms .. 2.8 s within minutes, swamping any ratio."""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from impl.fusion import TOLERANCE, VARIANTS, apply_fusion, max_rel_error
from impl.model import build_model, model_config

ROUNDS, WARMUP = 8, 2
CFG = model_config("small")
B, T = 8, 256
MEDIANS: dict[tuple[str, str], float] = {}
OPS = {
    "swiglu": ["reference", "cat", "packed", "compiled"],
    "add_rmsnorm": ["reference", "function", "compiled"],
    "block": ["reference", "fused", "compiled"],
    "adamw": ["reference", "foreach", "fused"],
}
CASES = [(op, v) for op, variants in OPS.items() for v in variants]


class BlockCall:
    """x -> model.layers[layer](x, cos, sin); its parameters get gradients too."""

    def __init__(self, model, layer: int) -> None:
        self.block, self.cos, self.sin = model.layers[layer], model.rope_cos[:T], model.rope_sin[:T]
        self.params = list(self.block.parameters())

    def __call__(self, x):
        return self.block(x, self.cos, self.sin)


def _leaf(*shape, gen, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=gen) * scale + offset).requires_grad_()


@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FUSION_BENCH_THREADS", "1")))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workloads():
    """op -> (inputs, cotangents, {variant: fn}); fns take the inputs."""
    g = torch.Generator().manual_seed(0)
    D, Fd = CFG.dim, CFG.ffn_dim
    w13 = torch.randn(2 * Fd, D, generator=g) * D**-0.5  # w1 | w3 adjacent, as apply_fusion packs them
    out = {
        "swiglu": ((_leaf(B, T, D, gen=g), w13[:Fd].requires_grad_(), w13[Fd:].requires_grad_()),
                   (torch.randn(B, T, Fd, generator=g),)),
        "add_rmsnorm": ((_leaf(B, T, D, gen=g), _leaf(B, T, D, gen=g), _leaf(D, gen=g, scale=0.1, offset=1.0), CFG.norm_eps),
                        (torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g))),
    }
    for op in ("swiglu", "add_rmsnorm"):
        fns = {"reference": VARIANTS[f"{op}/{OPS[op][1]}"][0]}
        fns |= {v: VARIANTS[f"{op}/{v}"][1] for v in OPS[op][1:]}
        out[op] = (*out[op], fns)
    # Block: layer 0 of three same-seed models; positions come from the model.
    blocks = {}
    for variant, mode in (("reference", "none"), ("fused", "fused"), ("compiled", "compile")):
        model = build_model(CFG, seed=0)
        apply_fusion(model, mode)
        blocks[variant] = BlockCall(model, layer=0)
    out["block"] = ((_leaf(B, T, D, gen=g),), (torch.randn(B, T, D, generator=g),), blocks)
    return out


def _fwd_bwd(fn, inputs, cotangents):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor)]
    # Weight gradients are part of the work (autograd skips what is not asked for).
    return outs, torch.autograd.grad(outs, leaves + getattr(fn, "params", []), cotangents)


@pytest.fixture(scope="module")
def references(workloads):
    """The reference outputs and input-gradients each fused run is checked against."""
    return {op: _fwd_bwd(fns["reference"], inputs, cots) for op, (inputs, cots, fns) in workloads.items()}


def _adamw_state():
    model = build_model(CFG, seed=0)
    params = [p.detach() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    return params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], \
        [torch.tensor(0.0) for _ in params]


def _paired_ratio(reference, fused, pairs: int = ROUNDS) -> float:
    """Median over alternating (reference, fused) calls of t_fused / t_ref: on a
    shared machine a neighbour's load then hits both sides of each pair."""
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        reference()
        t1 = time.perf_counter()
        fused()
        ratios.append((time.perf_counter() - t1) / (t1 - t0))
    return statistics.median(ratios)


def _record(benchmark, op: str, variant: str, paired: float | None) -> None:
    benchmark.extra_info["threads"] = torch.get_num_threads()
    median = benchmark.stats.stats.median
    MEDIANS[(op, variant)] = median
    base = MEDIANS.get((op, "reference"))
    if base is not None and variant != "reference":
        ratio = median / base
        benchmark.extra_info["time_vs_reference"] = ratio
        benchmark.extra_info["paired_time_vs_reference"] = paired
        print(f"\n{op}/{variant}: fused/unfused median time = {ratio:.3f} (paired {paired:.3f})")


@pytest.mark.parametrize("op,variant", CASES, ids=[f"{o}-{v}" for o, v in CASES])
def test_fused_op_time(benchmark, workloads, references, op, variant):
    benchmark.group = op
    if op == "adamw":
        state = _adamw_state()
        step = VARIANTS["adamw/foreach"][0] if variant == "reference" else VARIANTS[f"adamw/{variant}"][1]
        benchmark.pedantic(step, args=state, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
        assert all(s.item() == ROUNDS + WARMUP for s in state[4])
        ref = _adamw_state()
        for _ in range(ROUNDS + WARMUP):
            VARIANTS["adamw/foreach"][0](*ref)
        err = max(max_rel_error(a, b) for a, b in zip(state[0], ref[0]))
        paired = _paired_ratio(lambda: VARIANTS["adamw/foreach"][0](*ref), lambda: step(*state))
    else:
        inputs, cots, fns = workloads[op]
        fn = fns[variant]
        t0 = time.perf_counter()
        _fwd_bwd(fn, inputs, cots)  # first call: compiles the compiled variants
        benchmark.extra_info["first_call_s"] = time.perf_counter() - t0
        result = benchmark.pedantic(_fwd_bwd, args=(fn, inputs, cots), rounds=ROUNDS,
                                    warmup_rounds=WARMUP, iterations=1)
        ref_outs, ref_grads = references[op]
        err = max(max_rel_error(a, b) for a, b in zip(result[0] + result[1], ref_outs + ref_grads))
        paired = _paired_ratio(lambda: _fwd_bwd(fns["reference"], inputs, cots), lambda: _fwd_bwd(fn, inputs, cots))
    benchmark.extra_info["max_rel_error"] = err
    assert err <= TOLERANCE[torch.float32], (op, variant, err)
    _record(benchmark, op, variant, paired)
