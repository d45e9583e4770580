"""Under torchrun: the comm meter sees c10d and functional collectives and
applies the nccl-tests bus factors for the group size."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist._exit import finish
import torch.distributed._functional_collectives as fc
from torch.nn.parallel import DistributedDataParallel

from bench.meters.comm import CommMeter


def main() -> None:
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    x = torch.ones(1000)
    # Built outside the meter: construction verifies shapes with an all-gather.
    ddp = DistributedDataParallel(torch.nn.Linear(10, 10, bias=False))
    with CommMeter() as meter:
        dist.all_reduce(x)
        out = torch.empty(1000 * n)
        dist.all_gather_into_tensor(out, torch.ones(1000))
        rs_out = torch.empty(1000)
        dist.reduce_scatter_tensor(rs_out, torch.ones(1000 * n))
        dist.broadcast(x, src=0)
        y = fc.all_reduce(torch.ones(500), "sum", dist.group.WORLD)
        y = fc.wait_tensor(y)
        # DDP's all-reduce is issued from C++: the meter must still see it.
        ddp(torch.ones(2, 10)).sum().backward()
        dist.barrier()
    s = meter.summary()
    ar = s["all_reduce"]
    assert ar["calls"] == 3, ar  # c10d + functional + DDP's bucket
    assert ar["bytes"] == 4 * (1000 + 500 + 100), ar
    assert abs(ar["bus_bytes"] - ar["bytes"] * 2 * (n - 1) / n) < 1e-6
    ag, rs = s["all_gather"], s["reduce_scatter"]
    assert ag["bytes"] == 4000 * n and abs(ag["bus_bytes"] - 4000 * n * (n - 1) / n) < 1e-6, ag
    assert rs["bytes"] == 4000 * n and abs(rs["bus_bytes"] - 4000 * n * (n - 1) / n) < 1e-6, rs
    bc = s["broadcast"]
    assert bc["bytes"] >= 4000 and bc["bus_bytes"] == bc["bytes"]
    assert s["barrier"]["calls"] == 1 and s["barrier"]["bus_bytes"] == 0
    assert all(v["time_s"] >= 0 and v["group_sizes"] == [n] for v in s.values())
    assert y[0].item() == n and x[0].item() == n
    if rank == 0:
        print("OK", s)
    finish()


if __name__ == "__main__":
    main()
