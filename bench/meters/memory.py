"""Peak memory: CUDA allocator statistics, or on CPU a tensor-level tracker.

CPU has no allocator statistics. ``CpuPeakTracker`` runs the profiler with
``profile_memory=True`` from before the model is built through the warm-up
steps; each allocation event carries the process's live CPU tensor bytes
(``total_allocated``), and its peak during the last warm-up step is the
steady-state peak. Peak RSS (``VmHWM``) is reported separately and is only a
sanity check (it includes the interpreter, libraries and allocator caching).

c10's CPU allocator books a free only on a thread the profiler runs on, and
gloo's worker thread often drops the last reference to a collective's tensor
(``ProcessGroupGloo::runLoop`` releases the finished work after waking the
caller): 145 of 400 frees of all-reduced 256 KiB tensors went missing in one
run here, and the running sum of events grew by ~1 MiB per tensor-parallel
micro-batch. ``track_frees_on_every_thread`` sets c10's
``caffe2_report_cpu_memory_usage`` flag, which keeps the allocator's size
table on every thread, so ``total_allocated`` counts those frees too.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from typing import Any

import torch


def track_frees_on_every_thread(on: bool = True) -> bool:
    """Set (or clear) c10's ``FLAGS_caffe2_report_cpu_memory_usage`` (no Python
    binding; a global in libc10). False where this build does not export it:
    frees on other threads are then missed, and peaks of collective-heavy cells
    read high. Cleared after tracking, so timed steps do not pay the
    allocator's bookkeeping."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
        ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = on
    except (OSError, ValueError):
        return False
    return True


def _walk(events):
    for e in events:
        yield e
        yield from _walk(e.children)


class CpuPeakTracker:
    """Live CPU tensor bytes from before the model is built; ``peak_bytes`` is the
    peak inside the ``steady()`` window (the last warm-up step), so first-step
    transients that vary from launch to launch (DDP rebuilding its buckets
    after iteration 1: +Ψ·4 bytes in some launches only) do not enter it;
    ``peak_first_steps_bytes`` is the peak over the whole tracked span;
    ``every_thread`` says whether frees on other threads were counted."""

    MARK = "trainbench::steady_step"

    def __init__(self) -> None:
        # The non-Kineto profiler starts in ~1 ms; Kineto's first start costs ~1.4 s
        # per process, most of a cell's fixed cost. Both record the same
        # allocator events.
        from torch.autograd.profiler import profile

        self.every_thread = track_frees_on_every_thread()
        self._prof = profile(profile_memory=True, use_kineto=False)
        self.peak_bytes: int | None = None
        self.peak_first_steps_bytes: int | None = None

    def __enter__(self) -> "CpuPeakTracker":
        self._prof.__enter__()
        torch.empty(64, dtype=torch.uint8)  # the first event: its total less its size is the bytes live before
        return self

    def steady(self):
        return torch.autograd.profiler.record_function(self.MARK)

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)
        if self.every_thread:
            track_frees_on_every_thread(False)
        events = list(_walk(self._prof.kineto_results.experimental_event_tree()))
        marks = [e.start_time_ns for e in events if e.name == self.MARK]
        allocations = sorted(
            (e.start_time_ns, e.extra_fields.total_allocated, e.extra_fields.alloc_size)
            for e in events
            if isinstance(e.extra_fields, torch._C._profiler._ExtraFields_Allocation)
            and e.extra_fields.device.type == "cpu"
        )
        if not allocations:
            self.peak_bytes = self.peak_first_steps_bytes = 0
            return
        _, total, size = allocations[0]  # the probe from __enter__
        before = total - size  # still live from an earlier profiling span of this process
        live = [(t, total - before) for t, total, _ in allocations]
        self.peak_first_steps_bytes = max(b for _, b in live)
        start = marks[-1] if marks else None
        in_window = [b for t, b in live if start is None or t >= start]
        self.peak_bytes = max(in_window, default=self.peak_first_steps_bytes)


def peak_rss_bytes() -> int | None:
    """High-water mark of this process's resident set (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class CudaPeakWindow:
    """CUDA peaks over the same window as the CPU tracker's steady state: the
    metered (last) warm-up step. ``steady()`` resets torch's peak counters at its
    start and reads them at its end; the all-time peaks (build and first steps
    included) are kept separately, as the max of the counters before the reset,
    in the window and at the end of the run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before: dict[str, int] = {}
        self.window: dict[str, int] = {}

    def __enter__(self) -> "CudaPeakWindow":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _read(self) -> dict[str, int]:
        torch.cuda.synchronize(self.device)
        stats = torch.cuda.memory_stats(self.device)
        return {"allocated": int(stats.get("allocated_bytes.all.peak", 0)),
                "reserved": int(stats.get("reserved_bytes.all.peak", 0))}

    @contextlib.contextmanager
    def steady(self) -> Iterator[None]:
        self.before = self._read()
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        self.window = self._read()

    def peaks(self) -> dict[str, int]:
        end = self._read()
        window = self.window or end
        _, total = torch.cuda.mem_get_info(self.device)
        return {
            "peak_allocated_bytes": window["allocated"],
            "peak_reserved_bytes": window["reserved"],
            "peak_allocated_all_time_bytes": max(self.before.get("allocated", 0), window["allocated"], end["allocated"]),
            "peak_reserved_all_time_bytes": max(self.before.get("reserved", 0), window["reserved"], end["reserved"]),
            "device_total_bytes": int(total),
        }


def default_state_tensors(modules: list[Any], optimizers: list[Any]) -> dict[str, list[torch.Tensor]]:
    """Parameters and gradients of the modules, and every tensor in the optimizers' state."""
    params = [p for m in modules for p in m.parameters()]
    grads = [p.grad for p in params if p.grad is not None]
    state = [
        v
        for opt in optimizers
        for per_param in getattr(opt, "state", {}).values()
        if isinstance(per_param, dict)
        for v in per_param.values()
        if isinstance(v, torch.Tensor)
    ]
    return {"params": params, "grads": grads, "optimizer": state}


def model_state_bytes(tensors: dict[str, list[torch.Tensor]]) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this rank.

    Storages are de-duplicated, so flat buffers with parameter views (ZeRO,
    FSDP) are counted once, under the first category that reaches them, and a
    storage freed to size 0 (a ZeRO-3 unit between uses) counts nothing."""
    seen: set[int] = set()

    def add(t: Any) -> int:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return 0
        t = getattr(t, "_local_tensor", t)  # DTensor: the local shard
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()

    return {kind: sum(add(t) for t in tensors.get(kind, [])) for kind in ("params", "grads", "optimizer")}
