"""All-reduce algorithms over point-to-point send/recv, beside the backend's own.

Each function sums ``t`` in place across ``group`` (every rank ends with the
same sum) using only ``isend``/``irecv``, so its traffic is exactly what the
algorithm sends. Per-rank bytes sent for an S-byte tensor over N ranks:

* ring (Baidu/Horovod): reduce-scatter then all-gather around a ring, 2(N−1)
  steps of S/N each: 2S(N−1)/N — bandwidth-optimal, latency 2(N−1)·α.
* tree: reduce up a binary tree to rank 0, then broadcast down it: every
  non-root rank sends S once up and the root/interior ranks send S to each
  child: latency 2·log2(N)·α, interior links carry 2S.
* parameter server: every worker sends S to the server and receives S back;
  the server receives (N−1)·S, its link is the bottleneck (time ∝ (N−1)·S).
  Sharded (``servers=N``): rank i serves the i-th 1/N slice, which is
  reduce-scatter + all-gather: 2S(N−1)/N per rank, like the ring but all-to-all.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def _peers(group) -> tuple[int, int, Callable[[int], int]]:
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    glob = (lambda i: dist.get_global_rank(group, i)) if group is not None else (lambda i: i)
    return rank, n, glob


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """A receive buffer reused across calls: a fresh large CPU allocation is
    mmap-ed and page-faulted on every call, which costs more than the copy."""
    key = (like.numel(), like.dtype, like.device)
    if key not in _SCRATCH:
        if len(_SCRATCH) >= 8:  # a few sizes: the DDP buckets, or the benchmark's message
            _SCRATCH.clear()
        _SCRATCH[key] = torch.empty_like(like)
    return _SCRATCH[key]


def _exchange(send: torch.Tensor | None, dst: int | None, recv: torch.Tensor | None, src: int | None, group) -> None:
    ops = []
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send, dst, group))
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, src, group))
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def ring_all_reduce(t: torch.Tensor, group=None, segments: int = 8) -> None:
    rank, n, glob = _peers(group)
    if n == 1:
        return
    chunks = list(t.view(-1).tensor_split(n))
    right, left = glob((rank + 1) % n), glob((rank - 1) % n)
    scratch = _scratch(chunks[0])
    # Reduce-scatter: after n−1 steps rank r holds the full sum of chunk (r+1) % n.
    # Each chunk moves in `segments` pieces, all posted at once, so adding piece k
    # overlaps the transfer of piece k+1 (the pipelining gloo's own ring uses).
    for step in range(n - 1):
        send_i, recv_i = (rank - step) % n, (rank - step - 1) % n
        dst = chunks[recv_i]
        buf = scratch[: dst.numel()]
        pairs = [
            (dist.isend(a, right, group), dist.irecv(b, left, group), b, d)
            for a, b, d in zip(chunks[send_i].tensor_split(segments), buf.tensor_split(segments), dst.tensor_split(segments))
        ]
        for _, recv, b, d in pairs:
            recv.wait()
            d.add_(b)
        for send, *_ in pairs:
            send.wait()
    # All-gather: pass the reduced chunks around the ring.
    for step in range(n - 1):
        send_i, recv_i = (rank - step + 1) % n, (rank - step) % n
        works = [
            w
            for a, b in zip(chunks[send_i].tensor_split(segments), chunks[recv_i].tensor_split(segments))
            for w in (dist.isend(a, right, group), dist.irecv(b, left, group))
        ]
        for w in works:
            w.wait()


def tree_all_reduce(t: torch.Tensor, group=None) -> None:
    rank, n, glob = _peers(group)
    if n == 1:
        return
    children = [c for c in (2 * rank + 1, 2 * rank + 2) if c < n]
    parent = (rank - 1) // 2 if rank > 0 else None
    buf = _scratch(t)
    for c in children:  # reduce up
        _exchange(None, None, buf, glob(c), group)
        t.add_(buf)
    if parent is not None:
        _exchange(t, glob(parent), None, None, group)
        _exchange(None, None, t, glob(parent), group)  # broadcast down
    for c in children:
        _exchange(t, glob(c), None, None, group)


def ps_all_reduce(t: torch.Tensor, group=None, servers: int = 1) -> None:
    """Parameter server; ``servers`` = 1 (rank 0 serves everything) or N (sharded)."""
    rank, n, glob = _peers(group)
    if n == 1:
        return
    if servers not in (1, n):
        raise ValueError(f"servers must be 1 or the group size {n}, got {servers}")
    slices = list(t.view(-1).tensor_split(servers))
    for s, part in enumerate(slices):
        if rank == s:  # this rank serves slice s: gather, sum, send back
            buf = _scratch(part)
            for w in range(n):
                if w != s:
                    _exchange(None, None, buf, glob(w), group)
                    part.add_(buf)
            for w in range(n):
                if w != s:
                    _exchange(part, glob(w), None, None, group)
        else:
            _exchange(part, glob(s), None, None, group)
            _exchange(None, None, part, glob(s), group)


def backend_all_reduce(t: torch.Tensor, group=None) -> None:
    dist.all_reduce(t, group=group)


ALGORITHMS: dict[str, Callable[[torch.Tensor, object], None]] = {
    "backend": backend_all_reduce,
    "ring": ring_all_reduce,
    "tree": tree_all_reduce,
    "ps": ps_all_reduce,
    "ps_sharded": lambda t, group=None: ps_all_reduce(t, group, servers=dist.get_world_size(group)),
}


def backend_device(group=None) -> torch.device:
    """Where the group's collectives take tensors: NCCL the current CUDA device, gloo the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def validate_algorithm(name: str, group=None, numel: int = 1003) -> None:
    """Check an algorithm against the backend on a random tensor before timing it
    (llm.c style), on the backend's device (NCCL rejects CPU tensors). Raises
    AssertionError on a mismatch."""
    g = torch.Generator().manual_seed(dist.get_rank(group) + 1)
    x = torch.randn(numel, generator=g, dtype=torch.float64).to(backend_device(group))
    want = x.clone()
    dist.all_reduce(want, group=group)
    got = x.clone()
    ALGORITHMS[name](got, group)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
