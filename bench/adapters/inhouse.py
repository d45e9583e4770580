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
from impl.allreduce import ALGORITHMS, validate_algorithm
from impl.data_parallel import apply_data_parallel
from impl.model import Decoder
from impl.parallel_dims import ParallelDims
from impl.zero import apply_zero


class InhouseAdapter(Adapter):
    name = "inhouse"
    description = "TrainBench's reference implementations (impl/)"
    capabilities = Capabilities(
        runs=runs_everywhere(
            "data_parallel", "grad_accumulation", "zero1", "zero2", "zero3", "offload_optimizer",
            "allreduce_ring", "allreduce_tree", "allreduce_ps", "allreduce_ps_sharded", "precision_bf16",
            "optimizer_adamw", "optimizer_sgd", "device_cuda",
        ),
    )

    def why_not(self, knobs: Knobs) -> str | None:
        if knobs.offload == "optimizer+params":
            return "offload_params: parameter offload (ZeRO-Infinity style) is not implemented in impl/zero.py"
        if knobs.precision == "bf16" and not knobs.zero:
            return "precision_bf16: in-house mixed precision (fp32 master weights) comes with ZeRO; use zero >= 1"
        if knobs.allreduce != "backend" and knobs.zero:
            return f"allreduce_{knobs.allreduce}: ZeRO uses reduce-scatter/all-gather, not all-reduce; use zero = 0"
        return super().why_not(knobs)

    def build(self, knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
        notes = {"model_type": "impl.model.Decoder"}
        # Data parallelism (plain or ZeRO) goes on last: it must see the final
        # parameters after any technique that replaces or shards them.
        if knobs.zero:
            # Mixed precision: 16-bit parameters and gradients, fp32 master shards.
            param_dtype = torch.bfloat16 if knobs.precision == "bf16" else torch.float32
            model.to(param_dtype)
            zero = apply_zero(model, stage=knobs.zero, group=dist.group.WORLD, param_dtype=param_dtype,
                              offload_optimizer=knobs.offload == "optimizer")
            optimizer = zero.make_optimizer(lambda shards: torch_optimizer(knobs.optimizer, shards))
            step = accumulating_step(model, zero, microbatches=knobs.microbatches, no_sync=zero.no_sync)
            notes["zero_units"] = len(zero.units)
            return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes, state=zero.state_tensors)
        sync = None
        if dims.dp > 1:
            kwargs = {}
            if knobs.allreduce != "backend":
                validate_algorithm(knobs.allreduce)  # checked against the backend before it is timed
                kwargs["all_reduce"] = ALGORITHMS[knobs.allreduce]
                notes["allreduce"] = f"impl.allreduce.{knobs.allreduce} (synchronous in the hook: no overlap)"
            sync = apply_data_parallel(model, group=dist.group.WORLD, **kwargs)
        optimizer = torch_optimizer(knobs.optimizer, model.parameters())
        step = accumulating_step(
            model, optimizer, microbatches=knobs.microbatches, no_sync=sync.no_sync if sync else nullcontext
        )
        return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes)
