"""Data parallel: bucketed gradient all-reduce overlapped with backward (Li et al. 2020).

Gradients are grouped into buckets of about ``bucket_cap_bytes`` in reverse
registration order (roughly the order backward produces them). A
post-accumulate-grad hook on each parameter counts arrivals; when a bucket is
complete its gradients are copied into one flat buffer and all-reduced
asynchronously, so communication of late layers overlaps the backward of early
ones. A callback queued on the autograd engine waits for every bucket at the
end of backward, averages and writes the result back into ``.grad``.

Per rank and step this all-reduces Ψ elements: ring volume 2Ψ(N−1)/N.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

AllReduceFn = Callable[[torch.Tensor, "dist.ProcessGroup | None"], "dist.Work | None"]


def backend_all_reduce(flat: torch.Tensor, group: "dist.ProcessGroup | None") -> "dist.Work":
    return dist.all_reduce(flat, group=group, async_op=True)


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.pending = len(params)
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
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._sync = True
        self._callback_queued = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

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
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._sync:
            return
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True
        bucket = self._bucket_of[id(p)]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)

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

    def _finish(self) -> None:
        for bucket in self.buckets:
            if bucket.pending > 0:  # parameters that got no gradient this step
                self._launch(bucket)
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
            bucket.pending, bucket.work = len(bucket.params), None
        self._callback_queued = False


def apply_data_parallel(module: nn.Module, **kwargs) -> BucketedDataParallel:
    """Make ``module``'s backward all-reduce its gradients over ``group``."""
    return BucketedDataParallel(module, **kwargs)
