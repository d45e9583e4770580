"""The CUDA paths of the memory and communication meters (#23), on CPU with
torch.cuda's counters stood in for: the peak is the metered warm-up step's
(counters reset at its start) with the all-time peak kept apart, and every
metered collective on a CUDA tensor is bracketed by device synchronisation
(NCCL's Work.wait() does not block the host)."""
from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist

import bench.meters.comm as comm
from bench.meters.memory import CudaPeakWindow


class FakeAllocator:
    def __init__(self) -> None:
        self.current = self.peak = 0
        self.resets = self.syncs = 0

    def alloc(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)

    def free(self, n: int) -> None:
        self.current -= n


@pytest.fixture
def fake_cuda(monkeypatch):
    a = FakeAllocator()

    def reset(device=None):
        a.resets += 1
        a.peak = a.current

    def sync(device=None):
        a.syncs += 1

    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {
        "allocated_bytes.all.peak": a.peak, "reserved_bytes.all.peak": a.peak + 100})
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 << 30))
    return a


def test_peak_is_the_metered_step_and_the_all_time_peak_is_kept(fake_cuda):
    a, window = fake_cuda, CudaPeakWindow(torch.device("cuda", 0))
    a.alloc(10_000)  # build and the first warm-up step: a transient the steady state never reaches again
    a.free(8_000)
    with window.steady():  # the metered warm-up step
        a.alloc(3_000)
        a.free(3_000)
    a.alloc(500)  # the timed steps
    a.free(500)
    peaks = window.peaks()
    assert a.resets == 1
    assert peaks["peak_allocated_bytes"] == 2_000 + 3_000
    assert peaks["peak_allocated_all_time_bytes"] == 10_000
    assert peaks["peak_reserved_bytes"] == 5_100 and peaks["device_total_bytes"] == 80 << 30


def test_metered_cuda_collectives_are_synchronised(fake_cuda, monkeypatch):
    monkeypatch.setattr(comm, "_cuda_devices", lambda args: {torch.device("cuda", 0)})  # as for NCCL tensors
    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    try:
        meter = comm.CommMeter()
        with meter:
            dist.all_reduce(torch.ones(4))
            dist.all_reduce(torch.ones(4))
    finally:
        dist.destroy_process_group()
    assert meter.stats["all_reduce"].calls == 2
    assert fake_cuda.syncs == 4  # before and after each


def test_cpu_collectives_are_not_synchronised():
    assert comm._cuda_devices((torch.ones(2), [torch.zeros(1)])) == set()
