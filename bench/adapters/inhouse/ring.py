"""The `inhouse` adapter's ring self-attention plan (``sequence_parallel: ring``;
Li et al. 2021, arXiv 2105.13120): the tp-dimension ranks form the ring and
split every sequence into tp chunks, end to end; weights are replicated.

Each rank trains on its (b, T/r) slice of its data-parallel rows: the ring
core passes K/V between the ring's ranks (``impl.ring_attention``) and the
weight gradients — partial sums over disjoint tokens, exactly like
data-parallel replicas' — are averaged by ``impl.data_parallel`` over all
dp × r ranks. Every rank holds the same number of tokens, so the mean of the
ranks' local mean losses (what the harness reports) is the mean over all tokens."""
from __future__ import annotations

import torch
import torch.distributed as dist

from bench.adapters.base import TrainStep, Unsupported
from bench.adapters.step import accumulating_step
from bench.adapters.inhouse.optimizers import NOTES, make_optimizer
from bench.config.knobs import Knobs
from bench.meters.memory import default_state_tensors
from bench.workloads.train import Batch
from impl.data_parallel import apply_data_parallel
from impl.model import Decoder
from impl.parallel_dims import ParallelDims
from impl.ring_attention import apply_ring_attention
from impl.tensor_parallel import new_tp_dp_groups


def why_not_ring(knobs: Knobs) -> str | None:
    """Knob combinations the ring plan does not compose (checked before launch;
    tp ≥ 2, tp_mode 1d and seq_len % tp are knob errors, see ``bench.config.knobs``)."""
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
    return None


def build_ring(knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
    why = why_not_ring(knobs)
    if why:
        raise Unsupported(why)
    # The tp groups (neighbouring ranks) are the rings; a dedicated group, so
    # the ring's point-to-point never shares a gloo context with the gradient
    # all-reduce that overlaps backward.
    ring = apply_ring_attention(model, group=new_tp_dp_groups(dims).tp)
    # Plan order: the ring core and RoPE offsets change no parameter; then data
    # parallel over every rank (all hold the same weights); then the optimizer.
    sync = apply_data_parallel(model, group=dist.group.WORLD)
    optimizer = make_optimizer(knobs.optimizer, model.named_parameters())
    inner = accumulating_step(model, optimizer, microbatches=knobs.microbatches, no_sync=sync.no_sync)

    def step(batch: Batch) -> torch.Tensor:
        return inner(Batch(ring.shard(batch.inputs), ring.shard(batch.targets)))

    notes = {
        "model_type": "impl.model.Decoder",
        "optimizer_impl": NOTES[knobs.optimizer],
        "sequence_parallel": (f"impl.ring_attention ring self-attention (r={ring.size}): each rank holds T/r tokens "
                              "end to end, K/V chunks passed around the ring; weights replicated"),
        "data_parallel": f"impl.data_parallel over all {dims.world_size} ranks (dp={dims.dp} × ring={ring.size})",
        "loss": "each rank's mean over its T/r tokens; the ranks' mean is the mean over all tokens",
    }
    return TrainStep(step, modules=[model], optimizers=[optimizer], notes=notes,
                     state=lambda: default_state_tensors([model], [optimizer]))
