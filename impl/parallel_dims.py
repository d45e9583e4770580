"""Degrees of parallelism on one dp × pp × cp × tp grid (torchtitan's ParallelDims idea),
and the process groups of one rank on that grid.

Rank order (Megatron's): tp varies fastest, then cp, then pp, then dp, so a
tensor-parallel group sits on neighbouring ranks (one node, fastest links) and
a context-parallel ring on the next-nearest. With cp = 1 the coordinates are
exactly those of the dp × pp × tp grid."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True, slots=True)
class ParallelDims:
    world_size: int
    """Number of ranks in the job."""
    dp: int = 1
    """Data-parallel degree (replicas, or ZeRO shards)."""
    tp: int = 1
    """Tensor-parallel degree."""
    cp: int = 1
    """Context-parallel degree: ranks that split every sequence (ring self-attention)."""
    pp: int = 1
    """Pipeline-parallel degree (stages)."""

    def __post_init__(self) -> None:
        for name in ("world_size", "dp", "cp", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dp * self.cp * self.tp * self.pp != self.world_size:
            cp = f"cp={self.cp}, " if self.cp > 1 else ""
            raise ValueError(
                f"dp*{'cp*' if self.cp > 1 else ''}tp*pp = {self.dp * self.cp * self.tp * self.pp} but world_size = "
                f"{self.world_size} (dp={self.dp}, {cp}tp={self.tp}, pp={self.pp})"
            )

    @classmethod
    def derive(cls, *, world_size: int, tp: int = 1, pp: int = 1, dp: int | None = None, cp: int = 1) -> "ParallelDims":
        """Fill in dp = world_size / (cp*tp*pp) when it is omitted."""
        if dp is None:
            if world_size % (cp * tp * pp):
                what = "cp*tp*pp" if cp > 1 else "tp*pp"
                cps = f"cp={cp}, " if cp > 1 else ""
                raise ValueError(
                    f"world_size = {world_size} is not divisible by {what} = {cp * tp * pp} ({cps}tp={tp}, pp={pp})"
                )
            dp = world_size // (cp * tp * pp)
        return cls(world_size=world_size, dp=dp, cp=cp, tp=tp, pp=pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp, pp, tp) coordinates of a rank (its cp coordinate: ``cp_rank``)."""
        tp_rank = rank % self.tp
        pp_rank = (rank // (self.tp * self.cp)) % self.pp
        dp_rank = rank // (self.tp * self.cp * self.pp)
        return dp_rank, pp_rank, tp_rank

    def cp_rank(self, rank: int) -> int:
        """A rank's place on its context-parallel ring (the sequence chunk it holds)."""
        return (rank // self.tp) % self.cp


@dataclass(frozen=True, slots=True)
class GridGroups:
    """This rank's groups on the dp × tp × pp grid, built once, in one order on
    every rank (``dist.new_group`` is collective)."""

    dims: ParallelDims
    tp: object | None
    """Tensor-parallel group: same (dp, pp) coordinates; None when tp = 1."""
    dp: object | None
    """Data-parallel group: same (pp, tp) coordinates; None when dp = 1."""
    pp_ranks: list[int]
    """Global ranks of this rank's pipeline, stage order: same (dp, tp) coordinates."""


def new_grid_groups(dims: ParallelDims) -> GridGroups:
    import torch.distributed as dist

    rank = dist.get_rank()
    coords = [dims.coords(r) for r in range(dims.world_size)]
    dp_rank, pp_rank, tp_rank = coords[rank]

    def groups(key, wanted: bool):
        mine = None
        if not wanted:
            return None
        for k in sorted({key(c) for c in coords}):
            g = dist.new_group([r for r, c in enumerate(coords) if key(c) == k])
            if k == key(coords[rank]):
                mine = g
        return mine

    tp = groups(lambda c: (c[0], c[1]), dims.tp > 1)
    dp = groups(lambda c: (c[1], c[2]), dims.dp > 1)
    pp_ranks = sorted((r for r, c in enumerate(coords) if (c[0], c[2]) == (dp_rank, tp_rank)),
                      key=lambda r: coords[r][1])
    return GridGroups(dims=dims, tp=tp, dp=dp, pp_ranks=pp_ranks)


@dataclass(frozen=True, slots=True)
class ContextGroups:
    """This rank's groups for context parallelism composed with tensor parallelism
    (Megatron's context parallelism: the ring splits the sequence, tp splits the
    weights, and the gradient average runs over every rank holding the same shard)."""

    cp: object
    """The ring: same (dp, pp, tp) coordinates."""
    tp: object | None
    """Tensor-parallel group: same (dp, pp, cp); None when tp = 1."""
    replicas: object
    """dp × cp ranks with the same (pp, tp): they hold the same weights, so their
    gradients (partial sums over disjoint tokens) are averaged over this group."""


def new_context_groups(dims: ParallelDims) -> ContextGroups:
    """Build every cp, tp and replica group of the grid; collective: all ranks
    call it, in the same order, as ``dist.new_group`` requires."""
    import torch.distributed as dist

    rank = dist.get_rank()
    coords = [(*dims.coords(r), dims.cp_rank(r)) for r in range(dims.world_size)]  # (dp, pp, tp, cp)

    def mine(key):
        found = None
        for k in sorted({key(c) for c in coords}):
            g = dist.new_group([r for r, c in enumerate(coords) if key(c) == k])
            if k == key(coords[rank]):
                found = g
        return found

    cp = mine(lambda c: (c[0], c[1], c[2]))
    tp = mine(lambda c: (c[0], c[1], c[3])) if dims.tp > 1 else None
    replicas = mine(lambda c: (c[1], c[2]))
    return ContextGroups(cp=cp, tp=tp, replicas=replicas)
