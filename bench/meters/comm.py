"""Communication meter: every collective any adapter issues, counted at the dispatcher.

A ``TorchDispatchMode`` sees the ``c10d::*`` and ``_c10d_functional::*`` ops,
so it counts DDP's C++-issued bucket all-reduce, DTensor/functional
collectives and DeepSpeed's calls alike (patching ``torch.distributed`` in
Python misses the first two).

Bytes follow nccl-tests (DESIGN.md): payload is the tensor size (all-gather:
the output; reduce-scatter and all-to-all: the input) and bus bytes are
payload × the bus factor for the group size n: all-reduce 2(n−1)/n;
all-gather, reduce-scatter, all-to-all (n−1)/n; broadcast, reduce, send 1;
recv 0 (its bytes are the sender's; payload is still recorded). These are *logical* bytes: gloo runs reduce-scatter as a full
all-reduce on the wire, which is not counted.

While metering, each collective is waited for before returning — and on CUDA
the device is synchronised before and after it, since NCCL's ``Work.wait()``
does not block the host — so ``time_s`` is the collective's own completion
time, un-overlapped (for
send/recv it is only the time to post the operation: waiting there could
deadlock a batched exchange). The harness therefore meters an untimed step,
never the timed ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

COMM_FORMULA_VERSION = "nccl-tests-busbytes-v1"

# op name -> (collective kind, where the payload is: argument index or "out")
_C10D = {
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "allgather_": ("all_gather", 0),
    "_allgather_base_": ("all_gather", 0),
    "allgather_coalesced_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "reduce_scatter_": ("reduce_scatter", 1),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "alltoall_": ("all_to_all", 1),
    "alltoall_base_": ("all_to_all", 1),
    "broadcast_": ("broadcast", 0),
    "reduce_": ("reduce", 0),
    "gather_": ("gather", 1),
    "scatter_": ("scatter", 0),
    "send": ("send", 0),
    "recv_": ("recv", 0),
    "recv_any_source_": ("recv", 0),
    "barrier": ("barrier", None),
    "monitored_barrier_": ("barrier", None),
}
_FUNCTIONAL = {
    "all_reduce": ("all_reduce", 0),
    "all_reduce_": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "all_reduce_coalesced_": ("all_reduce", 0),
    "all_gather_into_tensor": ("all_gather", "out"),
    "all_gather_into_tensor_out": ("all_gather", "out"),
    "all_gather_into_tensor_coalesced": ("all_gather", "out"),
    "reduce_scatter_tensor": ("reduce_scatter", 0),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "all_to_all_single": ("all_to_all", 0),
    "broadcast": ("broadcast", 0),
    "broadcast_": ("broadcast", 0),
}


def bus_factor(kind: str, n: int) -> float:
    """nccl-tests bus-bandwidth factor for a collective over n ranks."""
    if kind == "all_reduce":
        return 2 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if kind in ("barrier", "recv"):
        # A recv's bytes are its peer's send: counting both would double p2p traffic.
        return 0.0
    return 1.0


@dataclass
class KindStats:
    calls: int = 0
    bytes: int = 0
    """Payload bytes (nccl-tests 'size')."""
    bus_bytes: float = 0.0
    time_s: float = 0.0
    group_sizes: set[int] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "bytes": self.bytes,
            "bus_bytes": self.bus_bytes,
            "time_s": self.time_s,
            "group_sizes": sorted(self.group_sizes),
        }


def _tensor_bytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


def _group_size(func, args) -> int:
    if func.namespace == "_c10d_functional":
        name = next(a for a in reversed(args) if isinstance(a, str))
        return dist.distributed_c10d._resolve_process_group(name).size()
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a).size()
            except RuntimeError:  # a ReduceOp or other custom class
                continue
    return dist.get_world_size()


def _cuda_devices(args) -> set:
    """The CUDA devices of a collective's tensors (empty on CPU/gloo)."""
    return {t.device for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_cuda}


def _wait(func, out) -> None:
    if func.namespace == "_c10d_functional":
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                torch.ops._c10d_functional.wait_tensor(t)
        return
    for o in tree_leaves(out):
        if isinstance(o, torch.ScriptObject):
            try:
                dist.distributed_c10d.Work.unbox(o).wait()
            except RuntimeError:
                continue


class CommMeter(TorchDispatchMode):
    """Counts collectives per kind while active. Use as a context manager."""

    def __init__(self, *, synchronous: bool = True) -> None:
        super().__init__()
        self.synchronous = synchronous
        self.stats: dict[str, KindStats] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        table = _C10D if func.namespace == "c10d" else _FUNCTIONAL if func.namespace == "_c10d_functional" else None
        rule = table.get(func._opname) if table is not None else None
        if rule is None:
            return func(*args, **kwargs)
        kind, where = rule
        devices = _cuda_devices(args) if self.synchronous else set()
        for d in devices:  # work queued before the collective is not its time
            torch.cuda.synchronize(d)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        if self.synchronous and kind not in ("send", "recv"):
            # Not p2p: a batched isend/irecv pair would deadlock if the send
            # were waited for before its partner recv is posted.
            _wait(func, out)
            # On NCCL, Work.wait() only makes the current stream wait: the host
            # returns at once. Synchronising the device makes time_s the completion.
            for d in devices:
                torch.cuda.synchronize(d)
        elapsed = time.perf_counter() - start
        payload = 0 if where is None else _tensor_bytes(out if where == "out" else args[where])
        n = _group_size(func, args)
        s = self.stats.setdefault(kind, KindStats())
        s.calls += 1
        s.bytes += payload
        s.bus_bytes += payload * bus_factor(kind, n)
        s.time_s += elapsed
        s.group_sizes.add(n)
        return out

    def summary(self) -> dict[str, dict[str, Any]]:
        return {kind: s.as_dict() for kind, s in sorted(self.stats.items())}

    @property
    def bus_bytes(self) -> float:
        return sum(s.bus_bytes for s in self.stats.values())
