"""Every monkeypatch TrainBench applies to Megatron-Core 0.16.1, in one place.

Megatron-Core computes on CPU tensors over gloo, but some of its calls assume a
CUDA device: the current device, the CUDA RNG state its tensor-parallel seed
tracker swaps, a causal mask built with ``device="cuda"``, device
synchronisation around pipeline sends. Each patch below replaces one such call
and nothing else (no file of Megatron's is edited). The adapter applies them
only when the cell's device is ``cpu`` (each cell runs in its own worker
processes, so a patch never leaks into another cell) and records their names
and descriptions in ``notes["patches"]`` with ``notes["patched"] = True``; the
report marks such cells "patched". On CUDA none of this is applied.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, slots=True)
class Patch:
    name: str
    replaces: str
    """The CUDA-only call, where it is, and what stands in for it on CPU."""
    apply: Callable[[], None]


def _current_device() -> None:
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")


def _rng_state() -> None:
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # The tracker saves the current state, seeds, saves the seeded state, restores the saved one.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)


def _causal_mask() -> None:
    import torch
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    utils.get_default_causal_mask = cpu_causal_mask
    fused_softmax.get_default_causal_mask = cpu_causal_mask


_FACTORY_MODULES = ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
                    "megatron.core.optimizer.grad_scaler", "megatron.core.distributed.param_and_grad_buffer",
                    "megatron.core.pipeline_parallel.schedules", "megatron.core.utils")


def _factories() -> None:
    """These modules' ``torch`` becomes a proxy whose tensor factories put
    ``device='cuda'`` tensors on the CPU; every other attribute is torch's."""
    import importlib
    import types

    import torch

    def cpu(factory):
        @functools.wraps(factory)
        def make(*args, device=None, pin_memory=False, **kwargs):
            if device is not None and torch.device(device).type == "cuda":
                device = "cpu"
            return factory(*args, device=device, **kwargs)
        return make

    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)  # module __getattr__ (PEP 562)
    for name in ("tensor", "zeros", "ones", "empty", "full"):
        setattr(proxy, name, cpu(getattr(torch, name)))
    for module in _FACTORY_MODULES:
        importlib.import_module(module).torch = proxy


def _type_names() -> None:
    """While the distributed optimizer is built, a CPU tensor's ``type()`` names its
    CUDA twin ('torch.FloatTensor' → 'torch.cuda.FloatTensor'): the constructor
    sorts parameters into fp32/fp16 groups by those strings."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    init, type_of = DistributedOptimizer.__init__, torch.Tensor.type

    def cuda_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return type_of(self).replace("torch.", "torch.cuda.", 1)
        return type_of(self, dtype, non_blocking, **kwargs)

    @functools.wraps(init)
    def cpu_init(self, *args, **kwargs):
        torch.Tensor.type = cuda_name
        try:
            init(self, *args, **kwargs)
        finally:
            torch.Tensor.type = type_of

    DistributedOptimizer.__init__ = cpu_init


def _synchronize() -> None:
    import torch

    torch.cuda.synchronize = lambda device=None: None


PATCHES: tuple[Patch, ...] = (
    Patch("current_device", "torch.cuda.current_device() (buffers, RoPE frequencies, DDP grad buffers) → "
          "torch.device('cpu')", _current_device),
    Patch("rng_state", "megatron.core.tensor_parallel.random._get/_set_cuda_rng_state, torch.cuda.get_rng_state "
          "and torch.cuda.manual_seed (the TP seed tracker's add and fork) → the CPU generator, saved and "
          "restored around each use as on CUDA", _rng_state),
    Patch("causal_mask", "megatron.core.transformer.utils.get_default_causal_mask (torch.ones(..., "
          "device='cuda')) → the same mask on CPU", _causal_mask),
    Patch("factories", "torch.tensor/zeros/ones/empty/full(..., device='cuda') in Megatron's optimizer, grad "
          "clipping, grad scaler, DDP buffers, pipeline schedules and utils (found-inf flags, loss scale, token counts, "
          "the grad-norm's local multi-tensor L2) "
          "→ the same tensors on CPU (those modules see a torch proxy; no other code is affected)", _factories),
    Patch("type_names", "Tensor.type() == 'torch.cuda.FloatTensor' checks in DistributedOptimizer's constructor "
          "→ CPU tensors report their CUDA type name, during that constructor only", _type_names),
    Patch("synchronize", "torch.cuda.synchronize() (pipeline p2p, timers) → no-op: CPU ops are synchronous",
          _synchronize),
)


def apply_cpu_patches() -> list[dict[str, str]]:
    """Apply every patch; return what the record lists under ``notes.patches``."""
    for p in PATCHES:
        p.apply()
    return [{"name": p.name, "replaces": p.replaces} for p in PATCHES]
