"""The `torch` adapter: PyTorch's own distributed training (DDP here; FSDP,
DTensor TP and pipelining arrive with the framework-adapters issue)."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel

from bench.adapters.base import Adapter, Capabilities, TrainStep, runs_everywhere
from bench.adapters.common import accumulating_step
from bench.knobs import Knobs
from bench.workload import torch_optimizer
from impl.model import Decoder
from impl.parallel_dims import ParallelDims


class TorchAdapter(Adapter):
    name = "torch"
    description = "PyTorch native: DistributedDataParallel"
    capabilities = Capabilities(
        runs=runs_everywhere(
            "data_parallel", "grad_accumulation", "optimizer_adamw", "optimizer_sgd", "optimizer_adafactor", "device_cuda"
        ),
    )

    def build(self, knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
        forward, no_sync = model, nullcontext
        if dims.dp > 1:
            # DDP's defaults (25 MB buckets) except broadcast_buffers: the model's
            # only buffers are the RoPE tables, identical on every rank, and
            # re-broadcasting them each forward would add traffic no user wants.
            ddp = DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
            )
            forward, no_sync = ddp, ddp.no_sync
        optimizer = torch_optimizer(knobs.optimizer, model.parameters())
        step = accumulating_step(forward, optimizer, microbatches=knobs.microbatches, no_sync=no_sync)
        return TrainStep(
            step,
            modules=[model],
            optimizers=[optimizer],
            notes={"model_type": "impl.model.Decoder", "wrapper": "DistributedDataParallel(broadcast_buffers=False)" if dims.dp > 1 else None},
        )
