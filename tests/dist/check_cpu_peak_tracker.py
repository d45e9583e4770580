"""CpuPeakTracker counts frees made on gloo's worker thread: 300 all-reduced
256 KiB tensors, each dropped at once, 10 of them kept; the peak must be the 10
kept, the one being reduced and at most two finished ones gloo's workers
still hold, not the hundred the profiler's own free
events would leave behind (their running sum is printed beside it)."""
import itertools

import torch
import torch.distributed as dist

from bench.meters.memory import CpuPeakTracker

dist.init_process_group("gloo")
x = torch.randn(65536)  # 256 KiB
size = x.numel() * 4
kept = []
with CpuPeakTracker() as tracker:
    for i in range(300):
        out = x.clone()
        dist.all_reduce(out)
        if i % 30 == 0:
            kept.append(out)
        del out
events = list(tracker._prof.kineto_results.events())
event_sum = max(itertools.accumulate(e.nbytes() for e in events if e.name() == "[memory]"))
assert tracker.every_thread
assert 10 * size <= tracker.peak_bytes <= 13 * size + 4096, (tracker.peak_bytes / size, event_sum / size)
print(f"OK rank {dist.get_rank()}: peak {tracker.peak_bytes / size:.2f} tensors "
      f"(profiler free events alone: {event_sum / size:.1f})")
dist.destroy_process_group()
