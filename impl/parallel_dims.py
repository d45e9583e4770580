"""Degrees of parallelism on one dp × tp × pp grid (torchtitan's ParallelDims idea)."""
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
