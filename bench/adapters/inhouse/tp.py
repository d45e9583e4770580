"""The `inhouse` adapter's tensor-parallel plan: ``impl.tensor_parallel`` (Megatron
1D TP, optionally Megatron sequence parallel) with ``impl.data_parallel`` over
the data-parallel replicas of a (dp, tp) grid.

The loss is the vocab-parallel cross-entropy on (B, T, V/t) logits, so the step
is written here rather than with ``common.accumulating_step`` (whose
``lm_loss`` needs the full logits)."""
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
from impl.tensor_parallel import apply_tensor_parallel, new_tp_dp_groups



def why_not_tensor_parallel(knobs: Knobs) -> str | None:
    """Knob combinations the in-house TP plan does not compose (checked before launch)."""
    if knobs.tp_mode in ("2d", "2.5d"):
        from bench.adapters.inhouse.tp2d import why_not_tp2d

        return why_not_tp2d(knobs)
    if knobs.tp_mode == "3d":
        from bench.adapters.inhouse.tp3d import why_not_tp3d

        return why_not_tp3d(knobs)
    if knobs.zero:
        return "tensor_parallel_1d with zero > 0: impl/zero.py shards over the world group, not a dp sub-group"
    if knobs.optimizer not in TP_OPTIMIZERS:
        return (f"optimizer_{knobs.optimizer} with tp > 1: its update is not element-wise, so on a weight shard it "
                f"differs from the unsharded update; TP runs {', '.join(TP_OPTIMIZERS)}")
    if knobs.precision != "fp32":
        return f"precision_{knobs.precision} with tp > 1: the in-house TP plan has no master-weight path yet (fp32 only)"
    if knobs.fusion != "none":
        return f"fusion_{knobs.fusion} with tp > 1: fused/compiled blocks replace the forwards the TP hooks wrap"
    if knobs.checkpointing != "none":
        return f"checkpointing_{knobs.checkpointing} with tp > 1: recompute would repeat the forward collectives; not wired"
    if knobs.allreduce != "backend":
        return f"allreduce_{knobs.allreduce} with tp > 1: TP collectives use the backend; not wired for the dp group"
    if knobs.sequence_parallel == "megatron" and knobs.seq_len % knobs.tp:
        return f"sequence_parallel_megatron: seq_len = {knobs.seq_len} is not divisible by tp = {knobs.tp}"
    return None


def build_tensor_parallel(knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
    why = why_not_tensor_parallel(knobs)
    if why:
        raise Unsupported(why)
    if knobs.tp_mode in ("2d", "2.5d"):
        from bench.adapters.inhouse.tp2d import build_tp2d

        return build_tp2d(knobs, model, dims, device)
    if knobs.tp_mode == "3d":
        from bench.adapters.inhouse.tp3d import build_tp3d

        return build_tp3d(knobs, model, dims, device)
    sp = knobs.sequence_parallel == "megatron"
    groups = new_tp_dp_groups(dims)
    # Plan order: shard first (the weights the optimizer and DP see are the
    # shards), then data parallel over the replicas holding the same shard,
    # then the optimizer on the final parameters.
    tp = apply_tensor_parallel(model, group=groups.tp, sequence_parallel=sp)
    sync = apply_data_parallel(model, group=groups.dp) if dims.dp > 1 else None
    optimizer = make_optimizer(knobs.optimizer, model.named_parameters())
    no_sync = sync.no_sync if sync else nullcontext

    def step(batch: Batch) -> torch.Tensor:
        optimizer.zero_grad()
        parts = batch.split(knobs.microbatches)
        total = torch.zeros(())
        for i, mb in enumerate(parts):
            with no_sync() if i < len(parts) - 1 else nullcontext():
                loss = tp.loss(model(mb.inputs), mb.targets) / len(parts)
                loss.backward()
            total += loss.detach().float().cpu()
        # Under SP the norm weights saw T/t positions each: sum over the group
        # (linear, so once after all micro-batches is enough).
        tp.sync_sequence_parallel_grads()
        optimizer.step()
        return total

    notes = {
        "model_type": "impl.model.Decoder",
        "optimizer_impl": NOTES[knobs.optimizer],
        "tensor_parallel": (f"impl.tensor_parallel 1D Megatron (tp={dims.tp}): column-parallel wq/wk/wv/w1/w3, "
                            "row-parallel wo/w2, vocab-parallel embedding, head and cross-entropy (logits never "
                            "gathered)" + (", Megatron sequence parallel" if sp else "")),
    }
    if sync is not None:
        notes["data_parallel"] = f"impl.data_parallel over the dp group ({dims.dp} replicas of each tp shard)"
    # This rank's shards, their gradients and AdamW/SGD state on the shards.
    return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes,
                     state=lambda: default_state_tensors([model], [optimizer]))
