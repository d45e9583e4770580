"""ZeRO stages 1–3 (Rajbhandari et al. 2020) over one data-parallel group.

Parameters are grouped into *units* (the embedding, each decoder block, the
final norm + head). Each unit's parameters live as views of one flat buffer,
padded to a multiple of N and split evenly: rank r owns elements
[r·S, (r+1)·S) of every unit (S = padded / N).

* Stage 1 partitions optimizer state: every rank keeps full parameters and
  full gradients; a unit's gradients are reduce-scattered when its backward
  completes, each rank updates its shard, then shards are all-gathered.
  Volume: RS Ψ(N−1)/N + AG Ψ(N−1)/N = 2Ψ(N−1)/N.
* Stage 2 also partitions gradients: the full gradients of a unit are freed
  as soon as they are reduce-scattered; only the owned shard is kept.
* Stage 3 also partitions parameters: a unit's flat buffer has its storage
  resized to 0 except between an all-gather before its forward (and again
  before its backward) and the end of that pass; the next unit is
  prefetched. Volume 3Ψ(N−1)/N.

Reduce-scatters are launched asynchronously from post-accumulate-grad hooks,
so they overlap the backward of earlier units. With a 16-bit ``param_dtype``
the optimizer updates an fp32 master copy of the shard (mixed precision).

ZeRO-Offload (Ren et al. 2021), ``offload_optimizer=True``: the fp32 master
shard and the optimizer state live in host memory and the update runs on the
CPU. Each unit's gradient shard is copied to the host when its
reduce-scatter completes, and the updated shard is copied back with a
non-blocking copy from pinned memory that the next step's all-gather waits
for. On a CPU-only machine the copies are host-to-host, so correctness is
tested here and the benefit is measured on GPUs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from impl.grad_hooks import GradReadyHooks

MAX_INFLIGHT_RS = 2
"""Stages 2/3: reduce-scatters (each holding a unit's full gradient) in flight at once."""


class _Unit:
    def __init__(self, modules: list[nn.Module], *, rank: int, world: int, param_dtype: torch.dtype,
                 stage: int, group, offload: bool) -> None:
        self.modules = modules
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.shard_numel = -(-self.numel // world)  # ceil
        self.padded = self.shard_numel * world
        self.rank, self.world, self.stage, self.group = rank, world, stage, group
        device = self.params[0].device
        self.full = torch.zeros(self.padded, dtype=param_dtype, device=device)
        offset = 0
        for p in self.params:
            n = p.numel()
            self.full[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.full[offset : offset + n].view_as(p)
            offset += n
        own = slice(rank * self.shard_numel, (rank + 1) * self.shard_numel)
        # Stage 3 keeps its shard in a tensor of its own; the full buffer is transient.
        self.shard = self.full[own].clone() if stage == 3 else self.full[own]
        if offload:
            # ZeRO-Offload: the fp32 master shard and its optimizer state live in
            # (pinned, on GPUs) host memory; the update runs on the CPU.
            pin = device.type == "cuda"
            master = torch.empty(self.shard_numel, dtype=torch.float32, pin_memory=pin)
            master.copy_(self.shard)
        else:
            master = self.shard if param_dtype == torch.float32 else self.shard.float()
        self.master = nn.Parameter(master)
        self.grad_shard: torch.Tensor | None = None
        self.host_ready: torch.cuda.Event | None = None  # offload on CUDA: the last D2H copy's event
        # Stage 1 keeps full gradients: as views of one flat buffer, so the
        # reduce-scatter reads them in place and the reduced shard is written
        # back into the owned region (no extra persistent copy).
        self.grad_full = torch.zeros_like(self.full) if stage == 1 else None
        self.work = None
        self.rs_out: torch.Tensor | None = None
        self.gather_work = None
        if stage == 3:
            self.free_params()

    # --- parameters (stage 3) -------------------------------------------------
    @property
    def gathered(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def start_gather(self) -> None:
        if self.gathered or self.gather_work is not None:
            return
        self.full.untyped_storage().resize_(self.padded * self.full.element_size())
        self.gather_work = dist.all_gather_into_tensor(self.full, self.shard, group=self.group, async_op=True)

    def wait_gather(self) -> None:
        self.start_gather()
        if self.gather_work is not None:
            self.gather_work.wait()
            self.gather_work = None

    def free_params(self) -> None:
        self.full.untyped_storage().resize_(0)

    # --- gradients ------------------------------------------------------------
    def attach_grad_views(self) -> None:
        """Stage 1: point every .grad at its slice of ``grad_full`` (zeroed)."""
        self.grad_full.zero_()
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = self.grad_full[offset : offset + n].view_as(p)
            offset += n

    def launch_reduce_scatter(self) -> None:
        if self.grad_full is not None:
            flat = self.grad_full
        else:
            flat = torch.zeros(self.padded, dtype=self.full.dtype, device=self.full.device)
            offset = 0
            for p in self.params:
                n = p.numel()
                if p.grad is not None:
                    flat[offset : offset + n].copy_(p.grad.reshape(-1))
                offset += n
        flat.div_(self.world)  # average first, as DDP does, so 16-bit sums stay in range
        self.rs_out = torch.empty(self.shard_numel, dtype=flat.dtype, device=flat.device)
        self.work = dist.reduce_scatter_tensor(self.rs_out, flat, group=self.group, async_op=True)
        if self.stage >= 2:  # only the owned shard of the gradient is kept
            for p in self.params:
                p.grad = None

    def finish_reduce_scatter(self) -> None:
        if self.work is None:
            return
        self.work.wait()
        self.work = None
        if self.grad_full is not None:
            own = self.grad_full[self.rank * self.shard_numel : (self.rank + 1) * self.shard_numel]
            own.copy_(self.rs_out)
            self.rs_out = own
        g = self.rs_out  # kept in the parameter dtype (2 bytes/param for 16-bit), upcast at step
        if g.device != self.master.device:
            g = g.to(self.master.device, non_blocking=True)  # gradient offload, D2H into pinned memory
            self.host_ready = torch.cuda.Event() if g.is_pinned() and torch.cuda.is_available() else None
            if self.host_ready is not None:
                self.host_ready.record()  # the host reads g only after this copy: wait_host()
        if self.grad_shard is not None:
            self.wait_host()
            self.grad_shard.add_(g)
        else:
            self.grad_shard = g
        self.rs_out = None

    def wait_host(self) -> None:
        """Block the host until the last asynchronous D2H gradient copy has landed
        (the stream also orders the previous step's H2D parameter copy before it)."""
        if self.host_ready is not None:
            self.host_ready.synchronize()
            self.host_ready = None


class ZeroDataParallel:
    """Shards optimizer state (1), gradients (2) and parameters (3) of ``model``
    across ``group``. Use ``make_optimizer`` for the optimizer over the owned
    shards, ``step()`` instead of ``optimizer.step()``, and ``zero_grad()``."""

    def __init__(self, model: nn.Module, units: list[list[nn.Module]], *, stage: int, group=None,
                 param_dtype: torch.dtype = torch.float32, offload_optimizer: bool = False,
                 prefetch: bool = True, scaler=None) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
        self.model, self.stage, self.group, self.prefetch = model, stage, group, prefetch
        # fp16: an impl.mixed_precision.DynamicLossScaler; every rank checks its
        # own gradient shards and the flag is all-reduced, so all skip together.
        self.scaler = scaler
        self.skipped_steps = 0
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        src = dist.get_global_rank(group, 0) if group is not None else 0
        for p in model.parameters():  # identical starting weights, as DDP does
            dist.broadcast(p.data, src=src, group=group)
        self.units = [
            _Unit(mods, rank=rank, world=world, param_dtype=param_dtype, stage=stage, group=group, offload=offload_optimizer)
            for mods in units
        ]
        covered = {id(p) for u in self.units for p in u.params}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ValueError(f"parameters outside every ZeRO unit: {missing}")
        self._inflight: list[int] = []
        self.hooks = GradReadyHooks([u.params for u in self.units], on_ready=self._on_unit_ready, on_end=self._finish)
        if stage == 3:
            for i, unit in enumerate(self.units):
                unit.modules[0].register_forward_pre_hook(self._pre_forward(i))
                unit.modules[-1].register_forward_hook(self._post_forward(i))

    # --- stage-3 parameter gathering -------------------------------------------
    def _pre_forward(self, i: int) -> Callable:
        def hook(module, args):
            self.units[i].wait_gather()
            if self.prefetch and i + 1 < len(self.units):
                self.units[i + 1].start_gather()
        return hook

    def _post_forward(self, i: int) -> Callable:
        def hook(module, args, output):
            unit = self.units[i]
            unit.free_params()
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._pre_backward(i))
        return hook

    def _pre_backward(self, i: int) -> Callable:
        def hook(grad):
            self.units[i].wait_gather()
            if self.prefetch and i > 0:
                self.units[i - 1].start_gather()
            return None
        return hook

    # --- gradient reduction ---------------------------------------------------
    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Stage 1 accumulates full gradients locally; stages 2 and 3 cannot keep
        full gradients, so they reduce-scatter every micro-batch (as DeepSpeed does)."""
        self.hooks.enabled = self.stage >= 2
        try:
            yield
        finally:
            self.hooks.enabled = True

    def _on_unit_ready(self, i: int) -> None:
        unit = self.units[i]
        if self.stage >= 2:
            # Bound the full-size gradient buffers in flight (each reduce-scatter
            # holds its unit's whole gradient until it completes): finish the
            # oldest before launching past MAX_INFLIGHT_RS, as FSDP and DeepSpeed's
            # bucket limit do. Unbounded, the peak held a full Ψ of gradients.
            self._inflight.append(i)
            while len(self._inflight) > MAX_INFLIGHT_RS:
                self.units[self._inflight.pop(0)].finish_reduce_scatter()
        unit.launch_reduce_scatter()
        if self.stage == 3:
            unit.free_params()

    def _finish(self, not_ready: list[int]) -> None:
        self._inflight.clear()
        for i in not_ready:  # units with parameters that got no gradient this step
            self.units[i].launch_reduce_scatter()
        for unit in self.units:
            unit.finish_reduce_scatter()
            if self.stage == 3:
                unit.free_params()

    # --- optimizer ------------------------------------------------------------
    def make_optimizer(self, factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        self.optimizer = factory([u.master for u in self.units])
        return self.optimizer

    def zero_grad(self) -> None:
        for unit in self.units:
            unit.grad_shard = None
            unit.master.grad = None
            if unit.grad_full is not None:
                unit.attach_grad_views()
            else:
                for p in unit.params:
                    p.grad = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: × the loss scale with fp16, else unchanged."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def step(self) -> bool:
        """One update of the owned shards; False when fp16 overflow skipped it."""
        for unit in self.units:
            unit.wait_host()  # offload: the host-side update reads the D2H-copied gradients
            g = unit.grad_shard if unit.grad_shard is not None else torch.zeros_like(unit.master)
            unit.master.grad = g.to(unit.master.dtype)
        if self.scaler is not None:
            group = self.group if self.group is not None else dist.group.WORLD
            found_inf = self.scaler.unscale_and_check([u.master.grad for u in self.units], group=group)
            self.scaler.update(found_inf)
            if found_inf:  # parameters, masters and optimizer state untouched
                self.skipped_steps += 1
                for unit in self.units:
                    unit.master.grad = None
                return False
        self.optimizer.step()
        for unit in self.units:
            unit.master.grad = None  # the fp32 upcast is transient
            if unit.master.data_ptr() != unit.shard.data_ptr():
                # fp32 master -> 16-bit and/or device shard (H2D with offload; async
                # from pinned memory, ordered before the next forward's gather).
                unit.shard.copy_(unit.master.detach(), non_blocking=True)
            if self.stage < 3:
                # Parameters are views of `full`; gather every rank's updated shard.
                dist.all_gather_into_tensor(unit.full, unit.shard.clone(), group=self.group)
        return True

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """What this rank holds, for the harness's model-state meter."""
        params = [u.full for u in self.units] + [u.shard for u in self.units]
        grads = [u.grad_full for u in self.units if u.grad_full is not None]
        grads += [p.grad for u in self.units for p in u.params if p.grad is not None]
        grads += [u.grad_shard for u in self.units if u.grad_shard is not None]
        optim = [u.master for u in self.units]
        for per_param in self.optimizer.state.values():
            optim += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        return {"params": params, "grads": grads, "optimizer": optim}


def decoder_units(model: nn.Module) -> list[list[nn.Module]]:
    """The decoder's natural units: embedding, each block, final norm + head."""
    return [[model.tok_embeddings], *[[layer] for layer in model.layers], [model.norm, model.output]]


def apply_zero(model: nn.Module, *, stage: int, group=None, param_dtype: torch.dtype = torch.float32,
               offload_optimizer: bool = False, scaler=None, prefetch: bool = True) -> ZeroDataParallel:
    return ZeroDataParallel(model, decoder_units(model), stage=stage, group=group, param_dtype=param_dtype,
                            offload_optimizer=offload_optimizer, scaler=scaler, prefetch=prefetch)
