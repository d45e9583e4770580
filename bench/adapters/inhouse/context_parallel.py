"""The `inhouse` adapter's context-parallel plan (``cp ≥ 2``, ``sequence_parallel: ring``):
ring self-attention (Li et al. 2021, arXiv 2105.13120) over the cp group, composed
with Megatron 1D tensor parallelism over the tp group as Megatron's context
parallelism composes them.

Every rank trains on its (b, T/cp) slice of its data-parallel rows. The ring core
passes K/V between the cp ranks (``impl.ring_attention``); with tp ≥ 2 the blocks
are Megatron-sharded first (``impl.tensor_parallel``), so each rank's attention
core sees its n_heads/tp heads and the ring moves only those. The weight
gradients of the ranks holding the same shard — partial sums over disjoint
tokens, exactly like data-parallel replicas' — are averaged by
``impl.data_parallel`` over those dp × cp ranks. Every rank holds the same number
of tokens, so the mean of the ranks' local mean losses (what the harness
reports) is the mean over all tokens."""
from __future__ import annotations

import torch

from bench.adapters.base import TrainStep, Unsupported
from bench.adapters.inhouse.optimizers import NOTES, TP_OPTIMIZERS, make_optimizer
from bench.adapters.step import accumulating_step
from bench.config.knobs import Knobs
from bench.meters.memory import default_state_tensors
from bench.workloads.train import Batch
from impl.data_parallel import apply_data_parallel
from impl.model import Decoder, lm_loss
from impl.parallel_dims import ParallelDims, new_context_groups
from impl.ring_attention import apply_ring_attention
from impl.tensor_parallel import apply_tensor_parallel


def why_not_ring(knobs: Knobs) -> str | None:
    """Knob combinations the context-parallel plan does not compose (checked before
    launch; cp ≥ 2, tp_mode 1d and seq_len % cp are knob errors, see ``bench.config.knobs``)."""
    if knobs.attention != "dense":
        return (f"sequence_parallel_ring with attention = {knobs.attention}: the ring core is dense causal attention "
                "and sparse patterns replace the same attention.core")
    if knobs.pp > 1:
        return "sequence_parallel_ring with pp > 1: the ring and pipeline plans are not composed"
    if knobs.zero:
        return "sequence_parallel_ring with zero > 0: not wired (impl/zero.py's groups ignore the ring)"
    if knobs.precision != "fp32":
        return f"sequence_parallel_ring with precision = {knobs.precision}: no master-weight path wired (fp32 only)"
    if knobs.fusion != "none":
        return f"sequence_parallel_ring with fusion = {knobs.fusion}: fused/compiled blocks bypass the ring core"
    if knobs.checkpointing != "none":
        return f"sequence_parallel_ring with checkpointing = {knobs.checkpointing}: recompute would repeat the ring passes; not wired"
    if knobs.allreduce != "backend":
        return f"sequence_parallel_ring with allreduce = {knobs.allreduce}: the gradient all-reduce uses the backend"
    if knobs.optimizer.startswith("onebit"):
        return f"sequence_parallel_ring with optimizer = {knobs.optimizer}: its compressed all-reduce is not wired to the ring ranks"
    if knobs.tp > 1 and knobs.optimizer not in TP_OPTIMIZERS:
        return (f"optimizer_{knobs.optimizer} with cp > 1 and tp > 1: its update is not element-wise, so on a weight "
                f"shard it differs from the unsharded update; TP runs {', '.join(TP_OPTIMIZERS)}")
    return None


def build_ring(knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
    why = why_not_ring(knobs)
    if why:
        raise Unsupported(why)
    # Dedicated groups: the ring's point-to-point never shares a gloo context
    # with the gradient all-reduce that overlaps backward, nor with TP's.
    groups = new_context_groups(dims)
    # Plan order: the ring core and RoPE offsets change no parameter; then the
    # TP shards (the weights data parallel and the optimizer see are shards);
    # then data parallel over the replicas of each shard; then the optimizer.
    ring = apply_ring_attention(model, group=groups.cp)
    tp = apply_tensor_parallel(model, group=groups.tp) if dims.tp > 1 else None
    sync = apply_data_parallel(model, group=groups.replicas)
    optimizer = make_optimizer(knobs.optimizer, model.named_parameters())
    loss_fn = tp.loss if tp else lm_loss
    inner = accumulating_step(model, optimizer, microbatches=knobs.microbatches, no_sync=sync.no_sync, loss=loss_fn)

    def step(batch: Batch) -> torch.Tensor:
        return inner(Batch(ring.shard(batch.inputs), ring.shard(batch.targets)))

    replicas = dims.world_size // dims.tp
    notes = {
        "model_type": "impl.model.Decoder",
        "optimizer_impl": NOTES[knobs.optimizer],
        "sequence_parallel": (f"impl.ring_attention ring self-attention over cp = {ring.size} ranks: each rank holds "
                              "T/cp tokens end to end, K/V chunks passed around the ring; "
                              + (f"weights Megatron-sharded over tp = {dims.tp} (each rank's ring moves its "
                                 f"n_heads/{dims.tp} heads)" if tp else "weights replicated")),
        "data_parallel": (f"impl.data_parallel over the {replicas} ranks holding the same weights "
                          f"(dp={dims.dp} × cp={ring.size})"),
        "loss": ("each rank's mean over its T/cp tokens" + (" (vocab-parallel over tp)" if tp else "")
                 + "; the ranks' mean is the mean over all tokens"),
    }
    if tp:
        notes["tensor_parallel"] = (f"impl.tensor_parallel 1D Megatron (tp={dims.tp}) inside each cp rank: "
                                    "column-parallel wq/wk/wv/w1/w3, row-parallel wo/w2, vocab-parallel embedding, "
                                    "head and cross-entropy")
    return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes,
                     state=lambda: default_state_tensors([model], [optimizer]))
