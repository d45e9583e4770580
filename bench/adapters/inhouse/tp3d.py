"""The `inhouse` adapter's 3D tensor-parallel plan (``tp_mode: 3d``, tp = q³;
Bian et al. 2021, arXiv 2105.14450): ``impl.tensor_parallel_3d`` on one
q×q×q cube, fp32, AdamW or SGD.

Each rank receives the whole batch (dp = 1) and trains its b/q² sequence
blocks (``impl.tensor_parallel_3d``'s layouts A and B); its loss is the mean
over the b/q² sequences of its logits, so the mean of the ranks' losses (what
the harness reports) is the batch mean. Divisibility (heads, features, vocab,
batch by q or q²) is a knob error, see ``bench.config.knobs``."""
from __future__ import annotations

import torch

from bench.adapters.base import TrainStep, Unsupported
from bench.adapters.inhouse.optimizers import NOTES, TP_OPTIMIZERS, make_optimizer
from bench.config.knobs import Knobs
from bench.meters.memory import default_state_tensors
from bench.workloads.train import Batch
from impl.model import Decoder
from impl.parallel_dims import ParallelDims
from impl.tensor_parallel_3d import apply_tensor_parallel_3d, new_cube



def why_not_tp3d(knobs: Knobs) -> str | None:
    """Knob combinations the 3D plan does not compose (checked before launch)."""
    if knobs.dp > 1:
        return ("tensor_parallel_3d with dp > 1: data parallel over cube replicas is not wired (it would need "
                "a dp group per cube rank and a 16-rank parity test); use world_size = tp")
    if knobs.pp > 1:
        return "tensor_parallel_3d with pp > 1: the 3D and pipeline plans are not composed"
    if knobs.zero:
        return "tensor_parallel_3d with zero > 0: impl/zero.py shards over the world group, not a cube"
    if knobs.sequence_parallel != "none":
        return (f"tensor_parallel_3d with sequence_parallel = {knobs.sequence_parallel}: 3D TP already splits "
                "the sequences over q² ranks; Megatron/ring SP are 1D plans")
    if knobs.optimizer not in TP_OPTIMIZERS:
        return (f"optimizer_{knobs.optimizer} with tp_mode 3d: its update is not element-wise, so on a weight "
                f"shard it differs from the unsharded update; 3D TP runs {', '.join(TP_OPTIMIZERS)}")
    if knobs.precision != "fp32":
        return f"precision_{knobs.precision} with tp_mode 3d: no master-weight path wired (fp32 only)"
    if knobs.fusion != "none":
        return f"fusion_{knobs.fusion} with tp_mode 3d: fused/compiled blocks replace the sharded linears' forwards"
    if knobs.checkpointing != "none":
        return (f"checkpointing_{knobs.checkpointing} with tp_mode 3d: recompute would repeat the forward "
                "collectives; not wired")
    if knobs.allreduce != "backend":
        return f"allreduce_{knobs.allreduce} with tp_mode 3d: the cube's collectives use the backend"
    if knobs.attention != "dense":
        return f"attention_{knobs.attention} with tp_mode 3d: sparse cores on the local heads are not tested with 3D TP"
    return None


def build_tp3d(knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
    why = why_not_tp3d(knobs)
    if why:
        raise Unsupported(why)
    # Plan order: shard first (the optimizer must see the shards), then the optimizer.
    tp = apply_tensor_parallel_3d(model, new_cube(dims))
    optimizer = make_optimizer(knobs.optimizer, model.named_parameters())

    def step(batch: Batch) -> torch.Tensor:
        optimizer.zero_grad()
        parts = batch.split(knobs.microbatches)
        total = torch.zeros(())
        for mb in parts:
            loss = tp.loss(model(mb.inputs), mb.targets)  # mean over this rank's b/q² sequences
            (loss * (tp.loss_scale / len(parts))).backward()
            total += loss.detach().float().cpu() / len(parts)
        # Each plane rank's norm-weight gradient covers its own sequences: sum
        # them (linear, so once after all micro-batches).
        tp.sync_norm_grads()
        optimizer.step()
        return total

    q = tp.cube.q
    notes = {
        "model_type": "impl.model.Decoder",
        "optimizer_impl": NOTES[knobs.optimizer],
        "tensor_parallel": (f"impl.tensor_parallel_3d 3D (Bian et al. 2021) on a {q}x{q}x{q} cube: every linear, "
                            "the embedding and the head gather input and weight blocks and reduce-scatter the "
                            "output; RMSNorm over split features; vocab-parallel loss (logits never gathered)"),
        "loss": "each rank's mean over its b/q² sequences; the ranks' mean is the batch mean",
    }
    return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes,
                     state=lambda: default_state_tensors([model], [optimizer]))
