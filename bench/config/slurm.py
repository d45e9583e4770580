"""``slurm:`` in a suite's run settings, validated at the door."""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

_TIME = r"^(\d+|\d+:\d{2}(:\d{2})?|\d+-\d{1,2}(:\d{2}(:\d{2})?)?)$"

class SlurmSettings(BaseModel):
    """``slurm:`` in a suite's run settings (used when ``launcher: slurm``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    partition: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.,-]+$")
    """``#SBATCH --partition``; none: the cluster's default."""
    account: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    """``#SBATCH --account``."""
    time: str | None = Field(default=None, pattern=_TIME)
    """``#SBATCH --time`` (minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]); none:
    the cell's ``timeout_s`` rounded up to minutes, plus 5 for start-up."""
    gpus_per_node: int | None = Field(default=None, ge=0, le=64)
    """``#SBATCH --gpus-per-node``; none: the ranks per node for cuda cells, 0 for cpu."""
    cpus_per_task: int | None = Field(default=None, ge=1, le=1024)
    """``#SBATCH --cpus-per-task`` (one task = one torchrun agent per node)."""
    rdzv_port: int = Field(default=29500, ge=1, le=65535)
    """Port of the c10d rendezvous on the allocation's first node."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run on the batch host before ``srun`` (``module load …``)."""
    extra_sbatch: list[str] = Field(default_factory=list)
    """More ``#SBATCH`` options, each written as ``--name=value``."""
    queue_timeout_s: float = Field(default=24 * 3600.0, gt=0)
    """How long a submitted job may wait to start before it is cancelled."""
    poll_s: float = Field(default=10.0, gt=0, le=600)
    """Seconds between ``sacct`` polls."""

    @model_validator(mode="after")
    def _lines(self) -> "SlurmSettings":
        for i, line in enumerate(self.extra_sbatch):
            if not re.fullmatch(r"--[a-z][a-z0-9-]*(=[^\s\n]+)?", line):
                raise ValueError(f"slurm.extra_sbatch[{i}] = {line!r}: write one option as --name=value")
        for i, line in enumerate(self.setup):
            if "\n" in line:
                raise ValueError(f"slurm.setup[{i}]: one shell line per entry")
        return self
