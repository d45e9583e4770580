"""Every monkeypatch TrainBench applies to Colossal-AI 0.5.0, in one place.

Colossal-AI's TorchFSDP and HybridParallel plugins compute on CPU tensors just
fine, but a few of their calls assume a CUDA (or NPU) device, or the torch
<= 2.5.1 that Colossal-AI pins. Each patch below replaces one such call, and
nothing else; the adapter applies them only when the cell's device is ``cpu``
(each cell runs in its own worker processes, so a patch never leaks into
another cell), and records the names and descriptions it applied in
``notes["patches"]`` with ``notes["patched"] = True``.
On CUDA none of this is applied: the plugins run as shipped.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, slots=True)
class Patch:
    name: str
    replaces: str
    """The CUDA-only call, where it is, and what stands in for it on CPU."""
    apply: Callable[[], None]


@contextlib.contextmanager
def _cpu_current_device():
    import torch

    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.current_device = original


def _fsdp_device_id() -> None:
    from colossalai.booster.plugin.torch_fsdp_plugin import TorchFSDPPlugin

    configure = TorchFSDPPlugin.configure

    @functools.wraps(configure)
    def cpu_configure(self, *args, **kwargs):
        # Only for the duration of configure(): FSDP1 then gets device_id=cpu,
        # the one setting with which FSDP1 runs on CPU (DESIGN.md).
        with _cpu_current_device():
            return configure(self, *args, **kwargs)

    TorchFSDPPlugin.configure = cpu_configure


def _cpu_accelerator_rng() -> None:
    import torch
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    CpuAccelerator.get_rng_state = lambda self, device=None: torch.get_rng_state()
    CpuAccelerator.manual_seed = lambda self, seed: torch.manual_seed(seed)


def _hccl_query() -> None:
    import torch.distributed as dist

    if not hasattr(dist, "is_hccl_available"):
        dist.is_hccl_available = lambda: False


PATCHES: dict[str, Patch] = {p.name: p for p in (
    Patch("fsdp_device_id",
          "TorchFSDPPlugin.configure passes FSDP(device_id=torch.cuda.current_device()), which raises without "
          "CUDA (torch_fsdp_plugin.py:533); inside configure() only, torch.cuda.current_device returns "
          "torch.device('cpu')",
          _fsdp_device_id),
    Patch("cpu_accelerator_rng",
          "CpuAccelerator.get_rng_state(device) calls torch.get_rng_state(device), which takes no argument, and "
          "CpuAccelerator.manual_seed raises 'not supported for cpu accelerator' (cpu_accelerator.py:102, 126); "
          "shardformer's Randomizer calls both when it replaces a layer. On CPU the device RNG is the CPU RNG: "
          "torch.get_rng_state() and torch.manual_seed(seed)",
          _cpu_accelerator_rng),
    Patch("hccl_query",
          "the pipeline's p2p._check_for_nccl_hccl_backend calls torch.distributed.is_hccl_available() "
          "(pipeline/p2p.py:159), which torch 2.13 no longer has (colossalai pins torch<=2.5.1); it answers "
          "False (no Ascend HCCL backend here)",
          _hccl_query),
)}
_applied: set[str] = set()


def apply_cpu_patches(*names: str) -> list[str]:
    """Apply the named patches (once per process); returns 'name: what it replaces' for each."""
    unknown = set(names) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown Colossal-AI CPU patches {sorted(unknown)}; known: {sorted(PATCHES)}")
    for name in names:
        if name not in _applied:
            PATCHES[name].apply()
            _applied.add(name)
    return [f"{name}: {PATCHES[name].replaces}" for name in names]
