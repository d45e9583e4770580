"""Under torchrun: in-house bucketed DP equals the unsharded model's gradients,
with many buckets, with gradient accumulation (no_sync), and overlaps backward."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist._exit import finish
from torch.testing import assert_close

from bench.meters.comm import CommMeter
from bench.workloads.train import global_batch, local_batch
from impl.data_parallel import apply_data_parallel
from impl.model import build_model, lm_loss, model_config


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = model_config("tiny")
    batch = global_batch(cfg, batch_size=4 * world, seq_len=16, seed=3, step=0)

    ref = build_model(cfg, seed=1)
    lm_loss(ref(batch.inputs), batch.targets).backward()

    # Different seed per rank: the wrapper must broadcast rank 0's weights.
    model = build_model(cfg, seed=1 if rank == 0 else 99)
    sync = apply_data_parallel(model, bucket_cap_bytes=64 * 1024)
    assert len(sync.buckets) > 4, len(sync.buckets)
    mine = local_batch(batch, dp_rank=rank, dp=world)
    with CommMeter() as meter:
        lm_loss(model(mine.inputs), mine.targets).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    stats = meter.summary()["all_reduce"]
    n_params = sum(p.numel() for p in model.parameters())
    assert stats["calls"] == len(sync.buckets) and stats["bytes"] == 4 * n_params

    # Gradient accumulation: two halves under no_sync + sync == the whole batch.
    model.zero_grad(set_to_none=True)
    halves = mine.split(2)
    with CommMeter() as meter:
        with sync.no_sync():
            (lm_loss(model(halves[0].inputs), halves[0].targets) / 2).backward()
        assert "all_reduce" not in meter.summary()
        (lm_loss(model(halves[1].inputs), halves[1].targets) / 2).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert meter.summary()["all_reduce"]["calls"] == len(sync.buckets)
    if rank == 0:
        print(f"OK buckets={len(sync.buckets)}")
    finish()


if __name__ == "__main__":
    main()
