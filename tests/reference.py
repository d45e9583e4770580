"""Single-process, unsharded references the distributed cells are checked against."""
from __future__ import annotations

import torch

from bench.workloads.train import global_batch, set_learning_rate, torch_optimizer
from impl.model import build_model, lm_loss, model_config


def reference_losses(*, model: str = "tiny", batch_size: int, seq_len: int, seed: int, steps: int,
                     optimizer: str = "adamw", lr: float | None = None) -> list[float]:
    """Plain training loop on the whole global batch, in fp32 (``lr``: the cell's knob)."""
    cfg = model_config(model)
    net = build_model(cfg, seed)
    set_learning_rate(lr)
    try:
        opt = torch_optimizer(optimizer, net.parameters())
    finally:
        set_learning_rate(None)
    losses = []
    for step in range(steps):
        b = global_batch(cfg, batch_size=batch_size, seq_len=seq_len, seed=seed, step=step)
        loss = lm_loss(net(b.inputs), b.targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def reference_run(cfg, batches, *, seed: int) -> tuple[torch.nn.Module, list[float], dict[str, torch.Tensor]]:
    """AdamW over ``batches`` on the unsharded model: the trained model, the
    losses, and the first step's gradients by name."""
    net = build_model(cfg, seed=seed)
    opt = torch_optimizer("adamw", net.parameters())
    losses, first_grads = [], {}
    for s, batch in enumerate(batches):
        loss = lm_loss(net(batch.inputs), batch.targets)
        loss.backward()
        if s == 0:
            first_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return net, losses, first_grads
