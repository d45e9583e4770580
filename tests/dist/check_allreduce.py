"""Under torchrun: each in-house all-reduce equals the backend's, and sends
exactly the bytes its theory says (busiest rank)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist._exit import finish

from bench.meters.comm import CommMeter
from bench.theory import allreduce_bytes_sent
from impl.allreduce import ALGORITHMS, validate_algorithm


def main() -> None:
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    for name in ("ring", "tree", "ps", "ps_sharded"):
        validate_algorithm(name, numel=4099)  # uneven chunks too
        t = torch.full((1 << 16,), float(rank + 1))
        with CommMeter() as meter:
            ALGORITHMS[name](t)
        assert torch.all(t == n * (n + 1) / 2), name
        sent = meter.summary()["send"]["bus_bytes"]
        everyone = [None] * n
        dist.all_gather_object(everyone, sent)
        expected = allreduce_bytes_sent(t.numel() * 4, n, name)
        assert abs(max(everyone) / expected - 1) < 0.01, (name, everyone, expected)
        if rank == 0:
            print(f"OK {name} busiest rank sent {max(everyone)} bytes (theory {expected})")
    finish()


if __name__ == "__main__":
    main()
