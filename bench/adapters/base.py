"""The adapter interface: capabilities as frozen data, and a build step.

Adapters only build a train step (forward + backward + optimizer step,
returning the loss); the harness times and measures it, identically for all.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from bench.config.knobs import Knobs
from bench.config.techniques import BY_NAME, used_by

if TYPE_CHECKING:
    import torch

    from bench.workloads.train import Batch
    from impl.model import Decoder
    from impl.parallel_dims import ParallelDims

ALL_DEVICES = frozenset({"cpu", "cuda"})


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an adapter runs, per technique name (see ``bench.config.techniques``).

    ``runs`` maps a technique to the devices it runs on; ``reasons`` says why a
    technique is absent, or why it is missing on some device."""

    runs: Mapping[str, frozenset[str]]
    reasons: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = (set(self.runs) | set(self.reasons)) - set(BY_NAME)
        if unknown:
            raise ValueError(f"capabilities name unknown techniques: {sorted(unknown)}")
        object.__setattr__(self, "runs", MappingProxyType(dict(self.runs)))
        object.__setattr__(self, "reasons", MappingProxyType(dict(self.reasons)))

    def support(self, technique: str, device: str) -> str | None:
        """None when supported, else the reason."""
        if technique not in self.runs:
            return self.reasons.get(technique, "not implemented by this adapter")
        if device not in self.runs[technique]:
            return f"not on {device}: {self.reasons.get(technique, 'not implemented for this device')}"
        return None

    def why_not(self, knobs: Knobs) -> str | None:
        reasons = []
        for name in used_by(knobs):
            why = self.support(name, knobs.device)
            if why:
                reasons.append(f"{name}: {why}")
        return "; ".join(reasons) or None


def runs_everywhere(*names: str) -> dict[str, frozenset[str]]:
    return {n: ALL_DEVICES for n in names}


class TrainStep:
    """What an adapter hands the harness: a callable doing one optimizer step.

    ``fn(batch)`` runs forward, backward and the optimizer step on this rank's
    local batch and returns the local mean loss (a detached scalar tensor).
    ``modules`` and ``optimizers`` let the harness count model-state bytes;
    an adapter whose state lives elsewhere (flat shards, offloaded copies)
    passes ``state``, returning the tensors per category instead.
    ``notes`` carries adapter facts the record must show (e.g. model type).
    ``skipped_steps`` (fp16 dynamic loss scaling) counts the updates skipped on
    overflow so far: the record shows them, since a skipped step is timed and
    its loss logged like any other."""

    def __init__(
        self,
        fn: Callable[["Batch"], "torch.Tensor"],
        *,
        modules: list[Any],
        optimizers: list[Any],
        notes: dict[str, Any] | None = None,
        state: Callable[[], dict[str, list[Any]]] | None = None,
        skipped_steps: Callable[[], int] | None = None,
    ) -> None:
        self.fn, self.modules, self.optimizers = fn, modules, optimizers
        self.notes = dict(notes or {})
        self._state = state
        self.skipped_steps = skipped_steps

    def state_tensors(self) -> dict[str, list[Any]]:
        """Tensors of parameters, gradients and optimizer state on this rank."""
        if self._state is not None:
            return self._state()
        from bench.meters.memory import default_state_tensors

        return default_state_tensors(self.modules, self.optimizers)

    def __call__(self, batch: "Batch") -> "torch.Tensor":
        return self.fn(batch)


class Unsupported(Exception):
    """Raised by ``build`` for a limitation found only at run time."""


class Adapter(ABC):
    name: str
    description: str
    capabilities: Capabilities

    def unavailable_reason(self) -> str | None:
        """Why this adapter cannot run at all on this installation (None when it can)."""
        return None

    def why_not(self, knobs: Knobs) -> str | None:
        return self.capabilities.why_not(knobs)

    @abstractmethod
    def build(self, knobs: Knobs, model: "Decoder", dims: "ParallelDims", device: "torch.device") -> TrainStep:
        """Wrap ``model`` per the knobs and return its train step."""
