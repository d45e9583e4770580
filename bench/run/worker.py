"""Runs inside every rank of one cell (``torchrun ... -m bench.run.worker PAYLOAD``).

Order: seed → (CPU: start the memory tracker) → build the model → adapter
builds the train step → warm-up steps (the last one metered for
communication, untimed) → timed steps, device-synchronised on every rank →
gather the per-rank figures → rank 0 writes ``result.json``.

A rank that fails writes ``error.rank<R>.json`` with its classification, so
the runner can tell an out-of-memory from a crash.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bench.run.launchers.process import die_with_parent

FAULT_SLOWDOWN = 0.20

# What a rank built is never freed: the rank ends with os._exit. Freeing a gloo
# process group (the last reference may be a DDP reducer's, or the group map
# that destroy_process_group clears) holds the GIL and waits for gloo's worker
# thread, which may still be freeing the last collective's tensors, and that
# needs the GIL: a deadlock at the end of the rank (a hang in 7 of 13 runs of
# 40 launches of a torch DDP cell here; py-spy: ~ProcessGroupGloo in
# pthread_mutex_lock, runLoop in ~AsyncAllgatherWork waiting for the GIL;
# tests/test_rank_exit.py).
_KEPT_UNTIL_EXIT: list[Any] = []


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.uname().nodename}.{os.getpid()}.tmp")  # nodes may share the folder
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def classify(exc: BaseException) -> str:
    from bench.adapters import Unsupported

    if isinstance(exc, Unsupported):
        return "unsupported"
    if isinstance(exc, MemoryError):
        return "oom"
    text = f"{type(exc).__name__}: {exc}"
    if "OutOfMemoryError" in text or "out of memory" in text or "can't allocate memory" in text:
        return "oom"
    return "error"


def main(argv: list[str]) -> int:
    die_with_parent()  # if torchrun or the warm launch leader dies, this rank goes too
    payload_path = Path(argv[0])
    payload = json.loads(payload_path.read_text())
    cell_dir = payload_path.parent
    rank = int(os.environ.get("RANK", "0"))
    (cell_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    try:
        record = run(payload, rank)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a result
        status = classify(exc)
        tail = "".join(traceback.format_exception(exc))[-4000:]
        _write_json(cell_dir / f"error.rank{rank}.json", {"status": status, "reason": f"{type(exc).__name__}: {exc}", "traceback": tail})
        print(tail, file=sys.stderr, flush=True)
        return 1
    if rank == 0 or os.environ.get("LOCAL_RANK") == "0":
        # Every node's first rank writes the (gathered, identical) record, so the
        # node whose runner classifies the cell has it wherever global rank 0 ran.
        _write_json(cell_dir / "result.json", record)
    return 0


def run(payload: dict[str, Any], rank: int) -> dict[str, Any]:
    import psutil

    phases = {"process_start": psutil.Process().create_time()}
    import torch
    import torch.distributed as dist

    from bench.config.knobs import Knobs
    from bench.meters.comm import CommMeter
    from bench.meters.memory import CpuPeakTracker, CudaPeakWindow, model_state_bytes, peak_rss_bytes

    phases["imported"] = time.time()
    knobs = Knobs.model_validate(payload["knobs"])
    from bench.workloads.train import set_learning_rate

    set_learning_rate(knobs.lr)
    steps, warmup, seed = payload["steps"], payload["warmup"], payload["seed"]
    dims = knobs.dims
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != knobs.world_size:
        raise RuntimeError(f"launched with WORLD_SIZE={world} but the cell has world_size={knobs.world_size}")

    if knobs.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    phases["process_group"] = time.time()
    try:
        torch.manual_seed(seed + rank)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        tracker = CpuPeakTracker() if device.type == "cpu" else CudaPeakWindow(device)
        with tracker:
            if knobs.workload == "allreduce":
                from bench.workloads.allreduce import build_allreduce_step

                step_fn, notes = build_allreduce_step(knobs, device)
                state_tensors = dict
            elif knobs.workload == "attention":
                from bench.workloads.attention import build_attention_step

                step_fn, notes = build_attention_step(knobs, device)
                state_tensors = dict
            else:
                step_fn, notes, state_tensors = _build_training(knobs, dims, device, seed, rank, world)
            _KEPT_UNTIL_EXIT.append((step_fn, state_tensors))
            losses: list[torch.Tensor | None] = []
            meter = CommMeter()
            for s in range(warmup):
                # The last warm-up step is the communication-metered one and the
                # CPU memory tracker's steady-state window.
                last = s == warmup - 1
                with meter if last else nullcontext(), tracker.steady() if last else nullcontext():
                    losses.append(step_fn(s))
            phases["built_and_warm"] = time.time()
        sync()
        phases["memory_tracker_read"] = time.time()

        samples: list[float] = []
        for s in range(warmup, warmup + steps):
            if hasattr(step_fn, "prepare"):
                step_fn.prepare(s)  # data is made outside the timed region
            if knobs.fault == "hang" and rank == world - 1:
                time.sleep(10**6)  # the other ranks now wait in the barrier
            dist.barrier()
            sync()
            start = time.perf_counter()
            losses.append(step_fn(s))
            sync()
            elapsed = time.perf_counter() - start
            if knobs.fault == "slow":
                time.sleep(FAULT_SLOWDOWN * elapsed)
                elapsed = time.perf_counter() - start
            samples.append(elapsed)

        phases["timed_done"] = time.time()
        state = model_state_bytes(state_tensors())
        mem = tracker.peaks() if device.type == "cuda" else {
            "peak_allocated_bytes": tracker.peak_bytes, "peak_first_steps_bytes": tracker.peak_first_steps_bytes,
        "every_thread": tracker.every_thread}
        mine = {
            "samples": samples,
            "losses": [None if l is None else float(l) for l in losses],
            "comm": meter.summary(),
            "comm_bus_bytes": meter.bus_bytes,
            "memory": mem,
            "peak_rss_bytes": peak_rss_bytes(),
            "model_state_bytes": state,
            "skipped_steps": step_fn.skipped_steps() if getattr(step_fn, "skipped_steps", None) else None,
            "phases": phases,
        }
        if device.type == "cuda":
            from bench.meters.throughput import cuda_gemm_flops, math_mode, tf32_settings

            mine["tf32"] = tf32_settings()
            if rank == 0:  # after the timed steps: the device's own GEMM ceiling in the cell's math mode
                mine["gemm_flops"] = cuda_gemm_flops(device, math_mode(knobs.precision,
                                                                       bool(mine["tf32"]["matmul_allow_tf32"])))
        if payload.get("profile_dir"):  # one extra step, after the timed ones, under torch.profiler
            from bench.meters.profile import profile_step

            mine["profile"] = profile_step(step_fn, warmup + steps, device=device, state_tensors=state_tensors,
                                           out_dir=Path(payload["profile_dir"]), rank=rank)
        everyone: list[dict[str, Any]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(everyone, mine)
        record = _combine(everyone, knobs, payload, notes, device)
        if payload.get("profile_dir"):
            from bench.meters.profile import combine

            record["metrics"]["profile"] = combine([r["profile"] for r in everyone], record["metrics"],
                                                   step_index=warmup + steps, trace_dir=payload["profile_trace_dir"])
        return record
    finally:
        from torch.distributed.distributed_c10d import _world

        _KEPT_UNTIL_EXIT.extend(_world.pg_map)  # every group: the world group and the adapters'
        dist.destroy_process_group()  # shuts the backends down (NCCL's communicators); frees nothing now


def _build_training(knobs, dims, device, seed: int, rank: int, world: int):
    """The model, the adapter's train step, and a step function over the
    deterministic batches (batch s is built before the clock starts)."""
    from bench import adapters
    from bench.workloads.train import global_batch, local_batch
    from impl.model import build_model, model_config

    cfg = model_config(knobs.model)
    model = build_model(cfg, seed, device)
    _inject_early_fault(knobs.fault, rank, world, device)
    train_step = adapters.get(knobs.adapter).build(knobs, model, dims, device)
    dp_rank = dims.coords(rank)[0]
    batches: dict[int, Any] = {}

    def batch_for(step: int):
        b = global_batch(cfg, batch_size=knobs.batch_size, seq_len=knobs.seq_len, seed=seed, step=step)
        b = local_batch(b, dp_rank=dp_rank, dp=dims.dp)
        return type(b)(b.inputs.to(device), b.targets.to(device))

    def step_fn(step: int):
        return train_step(batches.pop(step, None) or batch_for(step))

    step_fn.prepare = lambda step: batches.__setitem__(step, batch_for(step))  # type: ignore[attr-defined]
    step_fn.skipped_steps = train_step.skipped_steps  # type: ignore[attr-defined]
    return step_fn, train_step.notes, train_step.state_tensors


def _inject_early_fault(fault: str, rank: int, world: int, device) -> None:
    """Test-only faults (knob ``fault``), each a real failure, not a simulated one."""
    import resource

    import torch

    if fault == "raise" and rank == 0:
        raise RuntimeError("injected fault: raise")
    if fault == "oom" and rank == 0:
        # An allocation the allocator refuses (1 PiB): torch.OutOfMemoryError on
        # CUDA, "can't allocate memory" on CPU.
        torch.empty(2**50, dtype=torch.uint8, device=device)
    if fault == "memory_error" and rank == 0:
        bytearray(2**50)  # Python's own MemoryError (host memory)
    if fault in ("segfault", "abort") and rank == world - 1:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        if fault == "segfault":
            ctypes.string_at(0)
        os.abort()  # SIGABRT, as C++ "terminate called ..." does


def _combine(ranks: list[dict[str, Any]], knobs, payload, notes, device) -> dict[str, Any]:
    """Per-rank figures to one record's metrics: step time is the slowest
    rank's; memory is the max over ranks; losses average the ranks that hold one."""
    from bench.meters.throughput import FLOPS_FORMULA_VERSION, flops_per_token, gpu_peak_flops, math_mode, step_stats
    from impl.model import model_config

    n_steps = len(ranks[0]["samples"])
    samples = [max(r["samples"][i] for r in ranks) for i in range(n_steps)]
    losses = []
    for i in range(len(ranks[0]["losses"])):
        vals = [r["losses"][i] for r in ranks if r["losses"][i] is not None]
        losses.append(sum(vals) / len(vals) if vals else None)
    stats = step_stats(samples)
    if knobs.workload == "allreduce":
        from bench.workloads.allreduce import bandwidths

        return {"device_name": _device_name(device), "notes": notes, "phases_rank0": ranks[0]["phases"], "metrics": {
            "step_time_s": samples, "step_time_median_s": stats["median_s"], "step_time_stats": stats,
            "message_bytes": knobs.message_bytes, **bandwidths(knobs.message_bytes, knobs.world_size, stats["median_s"]),
            "bandwidth_definition": "nccl-tests: algbw = bytes/time, busbw = algbw*2(n-1)/n (median step)",
            "comm": ranks[0]["comm"], "comm_bytes_per_step": max(r["comm_bus_bytes"] for r in ranks),
            "comm_bytes_per_step_by_rank": [r["comm_bus_bytes"] for r in ranks],
            "peak_rss_bytes": _max(r["peak_rss_bytes"] for r in ranks),
            "peak_mem_bytes": _max(r["memory"].get("peak_allocated_bytes") for r in ranks),
            "peak_mem_first_steps_bytes": _max(r["memory"].get("peak_first_steps_bytes") for r in ranks),
            "losses": [], "tokens_per_s": None, "mfu": None,
        }}
    tokens_per_s = knobs.batch_size * knobs.seq_len / stats["median_s"]
    cfg = model_config(knobs.model)
    # Sparse attention: only computed blocks count (attention density), so MFU is never overstated.
    from bench.workloads.attention import ATTENTION_FLOPS_COUNTING, attention_density

    fpt = flops_per_token(cfg, knobs.seq_len, attention_density=attention_density(knobs),
                          attention_only=knobs.workload == "attention")
    flops_per_device = fpt * tokens_per_s / knobs.world_size
    device_name = _device_name(device)
    gemm = ranks[0].get("gemm_flops")
    if device.type == "cuda":
        tf32 = ranks[0].get("tf32") or {}
        mode = math_mode(knobs.precision, bool(tf32.get("matmul_allow_tf32")))
        peak = gpu_peak_flops(device_name, mode)
        peak_source = f"data sheet: {device_name}, dense {mode}"
    else:
        peak, peak_source = payload.get("cpu_peak_flops"), payload.get("cpu_peak_source")
    bus = [r["comm_bus_bytes"] for r in ranks]
    return {
        "device_name": device_name,
        "notes": notes,
        "phases_rank0": ranks[0]["phases"],
        "metrics": {
            "step_time_s": samples,
            "step_time_median_s": stats["median_s"],
            "step_time_stats": stats,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / knobs.world_size,
            "flops_per_token": fpt,
            "flops_formula": FLOPS_FORMULA_VERSION,
            "attention_density": attention_density(knobs),
            "attention_flops_counting": ATTENTION_FLOPS_COUNTING,
            "tflops_per_device": flops_per_device / 1e12,
            "peak_flops_per_device": peak,
            "peak_flops_source": peak_source if peak else None,
            "mfu": flops_per_device / peak if peak else None,
            "tf32": ranks[0].get("tf32"),
            "gemm_flops_measured": gemm,
            "mfu_vs_measured_gemm": flops_per_device / gemm if gemm else None,
            "peak_mem_bytes": _max(r["memory"].get("peak_allocated_bytes") for r in ranks),
            "peak_mem_first_steps_bytes": _max(r["memory"].get("peak_first_steps_bytes") for r in ranks),
            "peak_reserved_bytes": _max(r["memory"].get("peak_reserved_bytes") for r in ranks),
            "peak_mem_all_time_bytes": _max(r["memory"].get("peak_allocated_all_time_bytes") for r in ranks),
            "peak_reserved_all_time_bytes": _max(r["memory"].get("peak_reserved_all_time_bytes") for r in ranks),
            "device_total_bytes": ranks[0]["memory"].get("device_total_bytes"),
            "peak_mem_source": "cuda memory_stats allocated, peak in the last warm-up step (counters reset at its "
                               "start; all-time peak in peak_mem_all_time_bytes; max over ranks)"
            if device.type == "cuda"
            else "cpu: profiler live-tensor bytes (counted from before the build), peak in the last warm-up step (max over ranks)"
            + ("" if all(r["memory"].get("every_thread") for r in ranks) else "; frees on gloo threads missed (reads high)"),
            "peak_rss_bytes": _max(r["peak_rss_bytes"] for r in ranks),
            "model_state_bytes": {k: max(r["model_state_bytes"][k] for r in ranks) for k in ("params", "grads", "optimizer")},
            "comm": ranks[0]["comm"],
            "comm_bytes_per_step": max(bus),
            "comm_bytes_per_step_by_rank": bus,
            "comm_definition": "bus bytes (nccl-tests factors), logical, one metered warm-up step; time = completion of each collective run synchronously",
            "losses": losses,
            "losses_timed_from": payload["warmup"],
            # fp16: updates skipped on overflow (warm-up and timed steps), max over ranks; None without loss scaling
            "skipped_steps": _max(r.get("skipped_steps") for r in ranks),
        },
    }


def _device_name(device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return "cpu"


def _max(values) -> Any:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalisation (torch's teardown costs ~0.5 s per rank);
    # everything the record needs is on disk and the process group is destroyed.
    os._exit(code)
