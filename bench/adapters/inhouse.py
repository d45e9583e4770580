"""The `inhouse` adapter: TrainBench's own implementations from `impl/`.

Composition order lives in ``build`` (the plan function); the comments say why.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from bench.adapters.base import Adapter, Capabilities, TrainStep, runs_everywhere
from bench.adapters.common import accumulating_step
from bench.knobs import Knobs
from bench.workload import torch_optimizer
from impl.data_parallel import apply_data_parallel
from impl.model import Decoder
from impl.parallel_dims import ParallelDims
from impl.zero import apply_zero


class InhouseAdapter(Adapter):
    name = "inhouse"
    description = "TrainBench's reference implementations (impl/)"
    capabilities = Capabilities(
        runs=runs_everywhere(
            "data_parallel", "grad_accumulation", "zero1", "zero2", "zero3",
            "optimizer_adamw", "optimizer_sgd", "device_cuda",
        ),
    )

    def build(self, knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
        notes = {"model_type": "impl.model.Decoder"}
        # Data parallelism (plain or ZeRO) goes on last: it must see the final
        # parameters after any technique that replaces or shards them.
        if knobs.zero:
            zero = apply_zero(model, stage=knobs.zero, group=dist.group.WORLD)
            optimizer = zero.make_optimizer(lambda shards: torch_optimizer(knobs.optimizer, shards))
            step = accumulating_step(model, zero, microbatches=knobs.microbatches, no_sync=zero.no_sync)
            notes["zero_units"] = len(zero.units)
            return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes, state=zero.state_tensors)
        sync = apply_data_parallel(model, group=dist.group.WORLD) if dims.dp > 1 else None
        optimizer = torch_optimizer(knobs.optimizer, model.parameters())
        step = accumulating_step(
            model, optimizer, microbatches=knobs.microbatches, no_sync=sync.no_sync if sync else nullcontext
        )
        return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes)
