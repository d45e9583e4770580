"""Under torchrun: in-house ZeRO 1/2/3 with gradient accumulation (2 and 4
micro-batches, the harness's accumulating step) equal single-process SGD on
the full batch, compared on each parameter's *update* after 6 steps.

SGD, not AdamW: Adam's update m/√v is nearly invariant to the gradient's
scale, so a stage that summed instead of averaged its micro-batches
(gradients ×m) would still match under AdamW. SGD's update is linear in the
gradient: that bug moves it by 100 %, reduction-order noise by ~1e-6."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist._exit import finish

from bench.adapters.step import accumulating_step
from bench.workloads.train import global_batch, local_batch, set_learning_rate, torch_optimizer
from impl.model import build_model, lm_loss, model_config
from impl.zero import apply_zero

STEPS = 6
LR = 0.1  # at the default 1e-3 the update is ~1e-3 of the weight, and fp32 rounding of p − p0 alone is ~6e-5 of it
TOLERANCE = 1e-4  # ‖Δp − Δq‖ / ‖Δq‖ per tensor


def batches(cfg, batch_size):
    return [global_batch(cfg, batch_size=batch_size, seq_len=16, seed=4, step=s) for s in range(STEPS)]


def reference(cfg, batch_size):
    model = build_model(cfg, seed=6)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch_optimizer("sgd", model.parameters())
    for b in batches(cfg, batch_size):
        lm_loss(model(b.inputs), b.targets).backward()
        opt.step()
        opt.zero_grad()
    return start, [p.detach().clone() for p in model.parameters()]


def main() -> None:
    dist.init_process_group("gloo")
    set_learning_rate(LR)
    rank, n = dist.get_rank(), dist.get_world_size()
    cfg = model_config("tiny")
    batch_size = 4 * n
    start, want = reference(cfg, batch_size)
    for stage in (1, 2, 3):
        for micro in (2, 4):
            model = build_model(cfg, seed=6)
            zero = apply_zero(model, stage=stage)
            zero.make_optimizer(lambda shards: torch_optimizer("sgd", shards))
            step = accumulating_step(model, zero, microbatches=micro, no_sync=zero.no_sync)
            for b in batches(cfg, batch_size):
                step(local_batch(b, dp_rank=rank, dp=n))
            for unit in zero.units:
                unit.wait_gather() if stage == 3 else None
            worst = 0.0
            for (name, p), q, p0 in zip(model.named_parameters(), want, start):
                err = ((p.detach() - p0) - (q - p0)).norm() / (q - p0).norm()
                assert err < TOLERANCE, (stage, micro, name, err.item())
                worst = max(worst, err.item())
            if rank == 0:
                print(f"OK stage={stage} microbatches={micro} worst update error {worst:.1e}")
    finish()


if __name__ == "__main__":
    main()
