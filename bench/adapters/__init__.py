"""Adapter registry. Adapter modules are imported on demand, so listing or
validating never imports a framework."""
from __future__ import annotations

import importlib

from bench.adapters.base import Adapter, Capabilities, TrainStep, Unsupported

_REGISTRY: dict[str, str] = {
    "inhouse": "bench.adapters.inhouse.adapter:InhouseAdapter",
    "torch": "bench.adapters.torch.adapter:TorchAdapter",
    "deepspeed": "bench.adapters.deepspeed.adapter:DeepSpeedAdapter",
    "colossalai": "bench.adapters.colossalai.adapter:ColossalAIAdapter",
    "megatron": "bench.adapters.megatron.adapter:MegatronAdapter",
}
_cache: dict[str, Adapter] = {}


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Adapter:
    if name not in _REGISTRY:
        raise KeyError(f"adapter {name!r} is not registered; registered: {', '.join(_REGISTRY)}")
    if name not in _cache:
        module, cls = _REGISTRY[name].split(":")
        _cache[name] = getattr(importlib.import_module(module), cls)()
    return _cache[name]


def why_not(knobs) -> str | None:
    """The pre-launch verdict for one cell: None when it can run."""
    if knobs.adapter not in _REGISTRY:
        return f"adapter {knobs.adapter!r} is not implemented yet (registered: {', '.join(_REGISTRY)})"
    adapter = get(knobs.adapter)
    return adapter.unavailable_reason() or adapter.why_not(knobs)


__all__ = ["Adapter", "Capabilities", "TrainStep", "Unsupported", "get", "names", "why_not"]
