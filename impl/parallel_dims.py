"""Degrees of parallelism on one dp × tp × pp grid (torchtitan's ParallelDims idea),
and the process groups of one rank on that grid."""
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
    pp: int = 1
    """Pipeline-parallel degree (stages)."""

    def __post_init__(self) -> None:
        for name in ("world_size", "dp", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dp * self.tp * self.pp != self.world_size:
            raise ValueError(
                f"dp*tp*pp = {self.dp * self.tp * self.pp} but world_size = {self.world_size} "
                f"(dp={self.dp}, tp={self.tp}, pp={self.pp})"
            )

    @classmethod
    def derive(cls, *, world_size: int, tp: int = 1, pp: int = 1, dp: int | None = None) -> "ParallelDims":
        """Fill in dp = world_size / (tp*pp) when it is omitted."""
        if dp is None:
            if world_size % (tp * pp):
                raise ValueError(
                    f"world_size = {world_size} is not divisible by tp*pp = {tp * pp} (tp={tp}, pp={pp})"
                )
            dp = world_size // (tp * pp)
        return cls(world_size=world_size, dp=dp, tp=tp, pp=pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp, pp, tp) coordinates of a rank; tp varies fastest so a tensor-parallel
        group sits on neighbouring ranks (one node, fastest links)."""
        tp_rank = rank % self.tp
        pp_rank = (rank // self.tp) % self.pp
        dp_rank = rank // (self.tp * self.pp)
        return dp_rank, pp_rank, tp_rank


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
