"""The `inhouse` adapter's 2D (SUMMA) and 2.5D (Tesseract) tensor-parallel plan
(``tp_mode: 2d | 2.5d``): ``impl.tensor_parallel_2d`` / ``impl.tensor_parallel_2p5d``
on each replica's tp = q²·d ranks, ``impl.data_parallel`` over the dp replicas.

Every rank gets its replica's (b, s) batch; the plan picks the depth layer's
sequences for the model (the embedding scatters them over the grid rows) and
the row's targets for the vocab-parallel loss. The step's loss is the replica
mean, the same on every rank of the grid."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from bench.adapters.base import TrainStep, Unsupported
from bench.adapters.inhouse.optimizers import NOTES, TP_OPTIMIZERS, make_optimizer
from bench.config.knobs import Knobs
from bench.meters.memory import default_state_tensors
from bench.workloads.train import Batch
from impl.data_parallel import apply_data_parallel
from impl.model import Decoder
from impl.parallel_dims import ParallelDims
from impl.tensor_parallel_2d import apply_tensor_parallel_2d, new_grid
from impl.tensor_parallel_2p5d import apply_tensor_parallel_2p5d, new_grid_2p5d


def why_not_tp2d(knobs: Knobs) -> str | None:
    """Knob combinations the 2D/2.5D plan does not compose (checked before launch;
    grid shape and divisibility are knob errors, see ``bench.config.knobs``)."""
    name = f"tensor_parallel_{knobs.tp_mode}"
    if knobs.pp > 1:
        return f"{name} with pp > 1: the in-house 2D/2.5D TP and pipeline plans are not composed"
    if knobs.zero:
        return f"{name} with zero > 0: impl/zero.py shards over the world group, not the grid's dp sub-groups"
    if knobs.sequence_parallel != "none":
        return f"{name} with sequence_parallel = {knobs.sequence_parallel}: sequence parallelism is 1D-only"
    if knobs.optimizer not in TP_OPTIMIZERS:
        return (f"optimizer_{knobs.optimizer} with {name}: its update is not element-wise, so on a weight block it "
                f"differs from the unsharded update; 2D/2.5D TP runs {', '.join(TP_OPTIMIZERS)}")
    if knobs.precision != "fp32":
        return f"precision_{knobs.precision} with {name}: no master-weight path wired (fp32 only)"
    if knobs.fusion != "none":
        return f"fusion_{knobs.fusion} with {name}: fused/compiled blocks replace the forwards the grid linears run in"
    if knobs.checkpointing != "none":
        return f"checkpointing_{knobs.checkpointing} with {name}: recompute would repeat the SUMMA gathers; not wired"
    if knobs.allreduce != "backend":
        return f"allreduce_{knobs.allreduce} with {name}: grid and dp collectives use the backend"
    if knobs.attention != "dense":
        return f"attention_{knobs.attention} with {name}: sparse cores on the grid's head blocks are not verified"
    return None


def build_tp2d(knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
    why = why_not_tp2d(knobs)
    if why:
        raise Unsupported(why)
    depth = knobs.tp_depth if knobs.tp_mode == "2.5d" else 1
    # Plan order: shard onto the grid first (the optimizer and DP see the
    # blocks), then data parallel over the replicas holding the same block,
    # then the optimizer on the final parameters.
    if depth > 1:
        grid = new_grid_2p5d(dims, depth=depth)
        plan = apply_tensor_parallel_2p5d(model, grid)
    else:
        grid = new_grid(dims)
        plan = apply_tensor_parallel_2d(model, grid)
    sync = apply_data_parallel(model, group=grid.dp_group) if dims.dp > 1 else None
    optimizer = make_optimizer(knobs.optimizer, model.named_parameters())
    no_sync = sync.no_sync if sync else nullcontext

    def step(batch: Batch) -> torch.Tensor:
        optimizer.zero_grad()
        parts = batch.split(knobs.microbatches)
        total = torch.zeros(())
        for n, mb in enumerate(parts):
            with no_sync() if n < len(parts) - 1 else nullcontext():
                inputs, targets = plan.local_batch(mb.inputs, mb.targets)
                loss = plan.loss(model(inputs), targets) / len(parts)
                loss.backward()
            total += loss.detach().float().cpu()
        # Norm gradients over the grid column (and, 2.5D, everything over the
        # depth group): linear, so once after all micro-batches.
        plan.sync_grads()
        optimizer.step()
        return total

    q = grid.q
    shape = f"{q}×{q}" + (f"×{depth}" if depth > 1 else "")
    notes = {
        "model_type": "impl.model.Decoder",
        "optimizer_impl": NOTES[knobs.optimizer],
        "tensor_parallel": (f"impl.tensor_parallel_{'2p5d' if depth > 1 else '2d'} {knobs.tp_mode} on a {shape} grid: "
                            "SUMMA linears (input and weight all-gathers, ∂X/∂W reduce-scatters), embedding "
                            f"blocks (V/{q}, D/{q}), norms over the row group, vocab-parallel loss over the row group"
                            + (f"; batch split over {depth} depth layers, gradients summed over depth" if depth > 1
                               else "")),
    }
    if sync is not None:
        notes["data_parallel"] = f"impl.data_parallel over the dp group ({dims.dp} replicas of each grid block)"
    return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes,
                     state=lambda: default_state_tensors([model], [optimizer]))
