"""PyTorch's 1D tensor parallelism (DTensor ``parallelize_module``), Megatron layout.

The plan is torchtitan's Llama plan applied to ``impl.model.Decoder``
(Shoeybi et al. 2019, §3; t = tp degree):

* ``wq``/``wk``/``wv``/``w1``/``w3``: ColwiseParallel — weight (out, in)
  sharded on dim 0, so each rank holds n_heads/t heads (``Attention.forward``
  reads the local head count from the weight) or ffn_dim/t hidden units;
* ``wo``/``w2``: RowwiseParallel — weight sharded on dim 1 (the input
  features); the partial sums are all-reduced (or reduce-scattered under SP);
* ``tok_embeddings``: RowwiseParallel — the table sharded on the vocabulary
  (dim 0); ranks look up their rows and sum;
* ``output``: ColwiseParallel — the head sharded on the vocabulary, logits
  all-gathered to (B, T, V) for ``lm_loss``.

Sequence parallelism (Korthikanti et al. 2022, §4.2.2): the residual stream
and the RMSNorms run on (B, T/t, D) shards; each attention / MLP input is
all-gathered back to the full sequence (so RoPE sees every position, with
the full cos/sin tables), and wo/w2/tok_embeddings reduce-scatter along the
sequence instead of all-reducing.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from impl.model import Decoder


def apply_tensor_parallel(model: Decoder, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Shard ``model`` in place over the 1D ``tp_mesh``."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    # Layout of the residual stream between blocks: full (Replicate) or
    # sharded along the sequence (dim 1 of (B, T, D)).
    stream = Shard(1) if sequence_parallel else Replicate()
    root_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        "output": ColwiseParallel(input_layouts=stream, output_layouts=Replicate(), use_local_output=True),
    }
    if sequence_parallel:
        root_plan["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, root_plan)

    for block in model.layers:
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=stream),
        }
        # One DTensor per sub-layer input, kept as a DTensor (use_local_output=False):
        # wq/wk/wv (and w1/w3) then sum their Partial input gradients locally and
        # the backward reduces once per sub-layer — Megatron's f operator — rather
        # than once per projection (5 all-reduces per block instead of 2).
        # Under SP the same hook all-gathers (B, T/t, D) → (B, T, D), so RoPE sees
        # every position; cos/sin are plain (T, hs/2) tensors and pass through.
        plan["attention"] = PrepareModuleInput(
            input_layouts=(stream, None, None), desired_input_layouts=(Replicate(), None, None))
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),))
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)


class ReduceGradsThenStep:
    """The optimizer, after turning Partial gradients into Replicate ones.

    Under sequence parallelism each rank's RMSNorm weight gradient covers only
    its T/t positions, so DTensor leaves it ``Partial(sum)``. Left alone, every
    foreach op of the optimizer step redistributes it again, inside the
    dispatcher where the comm meter cannot see it; one explicit all-reduce per
    such parameter (Korthikanti et al. 2022 §4.2.2: the layer-norm gradients
    are summed over the tensor-parallel group) is both cheaper and metered."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        from torch.distributed.tensor import DTensor

        for p in self.params:
            g = p.grad
            if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
                p.grad = g.redistribute(g.device_mesh, p.placements)
        self.optimizer.step()
