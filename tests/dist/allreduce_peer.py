"""Rank 1 of the pytest-benchmark all-reduce group: it joins every call the
pytest process (rank 0) makes, following commands posted in the TCP store."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from impl.allreduce import ALGORITHMS


def main(init_method: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=1, world_size=2)
    store = dist.distributed_c10d._get_default_store()
    i = 0
    while True:
        cmd = store.get(f"cmd{i}").decode().split()
        i += 1
        if cmd[0] == "stop":
            break
        algorithm, numel, calls = cmd[0], int(cmd[1]), int(cmd[2])
        t = torch.ones(numel)
        for _ in range(calls):
            ALGORITHMS[algorithm](t, None)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip finalisation: gloo threads can abort the process at exit


if __name__ == "__main__":
    main(sys.argv[1])
