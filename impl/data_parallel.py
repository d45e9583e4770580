"""Data parallel: bucketed gradient all-reduce overlapped with backward (Li et al. 2020).

Gradients are grouped into buckets of about ``bucket_cap_bytes`` in reverse
registration order (roughly the order backward produces them). When a
bucket's last gradient is accumulated (``impl.grad_hooks``) its gradients are
copied into one flat buffer and all-reduced asynchronously, so communication
of late layers overlaps the backward of early ones. At the end of backward
every bucket is waited for and the averaged result written back into ``.grad``.

Per rank and step this all-reduces Ψ elements: ring volume 2Ψ(N−1)/N.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from impl.grad_hooks import GradReadyHooks

AllReduceFn = Callable[[torch.Tensor, "dist.ProcessGroup | None"], "dist.Work | None"]


def backend_all_reduce(flat: torch.Tensor, group: "dist.ProcessGroup | None") -> "dist.Work":
    return dist.all_reduce(flat, group=group, async_op=True)


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.buffer: torch.Tensor | None = None
        self.work: "dist.Work | None" = None


class BucketedDataParallel:
    """Installs the hooks on ``module``; the module itself is not wrapped.

    ``all_reduce`` is pluggable (the in-house ring/tree/PS algorithms use it);
    it may return a Work to wait on, or None when it completed synchronously.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        group: "dist.ProcessGroup | None" = None,
        bucket_cap_bytes: int = 25 * 2**20,
        all_reduce: AllReduceFn = backend_all_reduce,
        broadcast_from: int | None = 0,
    ) -> None:
        self.module, self.group, self.all_reduce = module, group, all_reduce
        self.world = dist.get_world_size(group)
        params = [p for p in module.parameters() if p.requires_grad]
        if broadcast_from is not None:
            # Start from identical weights, as DDP does at construction.
            src = dist.get_global_rank(group, broadcast_from) if group is not None else broadcast_from
            for p in params:
                dist.broadcast(p.data, src=src, group=group)
        self.buckets = self._make_buckets(list(reversed(params)), bucket_cap_bytes)
        self.hooks = GradReadyHooks([b.params for b in self.buckets],
                                    on_ready=lambda i: self._launch(self.buckets[i]), on_end=self._finish)

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], cap: int) -> list[_Bucket]:
        buckets, current, size = [], [], 0
        for p in params:
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > cap or p.dtype != current[0].dtype):
                buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            buckets.append(_Bucket(current))
        return buckets

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (gradient accumulation); the next
        backward outside this context all-reduces the accumulated sum."""
        self.hooks.enabled = False
        try:
            yield
        finally:
            self.hooks.enabled = True

    def _launch(self, bucket: _Bucket) -> None:
        first = bucket.params[0]
        if bucket.buffer is None:
            bucket.buffer = torch.empty(bucket.numel, dtype=first.dtype, device=first.device)
        offset = 0
        for p in bucket.params:
            n = p.numel()
            view = bucket.buffer[offset : offset + n]
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad.reshape(-1))
            offset += n
        # Average before summing, as DDP does, so fp16 sums do not overflow.
        bucket.buffer.div_(self.world)
        bucket.work = self.all_reduce(bucket.buffer, self.group)

    def _finish(self, not_ready: list[int]) -> None:
        for i in not_ready:  # buckets with parameters that got no gradient this step
            self._launch(self.buckets[i])
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            offset = 0
            for p in bucket.params:
                n = p.numel()
                flat = bucket.buffer[offset : offset + n].view_as(p)
                if p.grad is None:
                    p.grad = flat.clone()
                else:
                    p.grad.copy_(flat)
                offset += n
            bucket.work = None


def apply_data_parallel(module: nn.Module, **kwargs) -> BucketedDataParallel:
    """Make ``module``'s backward all-reduce its gradients over ``group``."""
    return BucketedDataParallel(module, **kwargs)
