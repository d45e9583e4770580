"""Distilling one profiled step's Chrome trace (``bench.meters.profile.profile_step``) into per-rank figures:
the step-time breakdown, collectives, top operators, memory at the peak and a timeline.

* Phases, without touching any adapter: ``torch.autograd.backward`` (which
  ``Tensor.backward``, DeepSpeed and torch pipelining all call) is wrapped in a
  ``trainbench::backward`` range for the step. *Backward* is those ranges;
  *optimizer* is everything after the last backward (ZeRO's shard update and
  all-gather, DDP's step); *forward* is the rest (forward, loss, zero_grad).
* Compute C: on CPU, the main thread's operator time minus its time inside
  ``c10d::*`` ops; on CUDA, non-NCCL kernels. Communication M: ``gloo:*``
  ranges (gloo's worker threads) and the main thread inside ``c10d::*``; on
  CUDA, NCCL kernels. Per step: forward/backward/optimizer = |C ∩ phase|;
  exposed communication = |M − C|; idle = wall − |C ∪ M| (host overhead,
  waiting). The five parts sum to the step's wall time.
* Collectives from the trace's outermost ``c10d::*`` ops (kind and payload
  per ``bench.meters.comm``'s table, bytes from the recorded shapes and
  dtypes), bus bytes with the nccl-tests factors.
* Memory: live bytes = start + running sum of the step's allocator events
  (CUDA: the allocator's own "Total Allocated"; CPU: model state at the start
  — parameters, optimizer state and the gradients that survive the step —
  plus net allocations; a block allocated before the profiler started and
  freed during the step is not reported by the profiler). At the peak, each
  live allocation made in the step is attributed by address: a storage of the
  adapter's ``state_tensors()`` after the step → params/grads/optimizer; a
  storage autograd saved for backward → activations; anything else (bucket
  and gather buffers, temporaries) → buffers.
"""
from __future__ import annotations

from typing import Any

from bench.meters.comm import _C10D

PROFILE_FORMULA_VERSION = "profile-breakdown-v1"
PARTS = ("forward", "backward", "optimizer", "exposed_comm", "idle")
BACKWARD_MARK = "trainbench::backward"
STEP_MARK = "trainbench::step"
_DTYPE_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4,
                "signed char": 1, "unsigned char": 1, "bool": 1, "short int": 2, "c10::Float8_e4m3fn": 1}
TIMELINE_SEGMENTS = 400


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        elif b > a:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def _minus(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for a, b in x:
        cur = a
        for c, d in y:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def _bytes_of(dims: Any, dtype: Any) -> int:
    if not isinstance(dims, list):
        return 0
    if dims and all(isinstance(d, list) for d in dims):  # a tensor list
        return sum(_bytes_of(d, dtype) for d in dims)
    n = 1
    for d in dims:
        n *= int(d)
    return n * _DTYPE_BYTES.get(dtype, 4)


def distil(events: list[dict], *, device_type: str, before: dict[int, tuple[str, int]],
           after: dict[int, tuple[str, int]], saved: set[int], start_alloc: int | None) -> dict[str, Any]:
    """Per-rank figures from one step's Chrome-trace events (times in seconds)."""
    step = next(e for e in events if e.get("name") == STEP_MARK and e.get("ph") == "X")
    t0, t1, main = step["ts"], step["ts"] + step["dur"], step["tid"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e and t0 <= e["ts"] <= t1]
    backward = _union([(e["ts"], e["ts"] + e["dur"]) for e in spans if e["name"] == BACKWARD_MARK])
    last_bwd = backward[-1][1] if backward else t1
    phases = {"backward": backward, "optimizer": [(last_bwd, t1)] if last_bwd < t1 else []}
    phases["forward"] = _minus(_minus([(t0, t1)], backward), phases["optimizer"])

    c10d = [e for e in spans if e["tid"] == main and e["name"].startswith("c10d::")]
    c10d_iv = _union([(e["ts"], e["ts"] + e["dur"]) for e in c10d])
    kernels = [e for e in spans if e.get("cat") == "kernel"]
    if device_type == "cuda" and kernels:
        comm = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower()])
        compute = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()])
    else:
        ops = [(e["ts"], e["ts"] + e["dur"]) for e in spans
               if e["tid"] == main and e.get("cat") == "cpu_op" and not e["name"].startswith("c10d::")]
        compute = _minus(_union(ops), c10d_iv)
        comm = _union([(e["ts"], e["ts"] + e["dur"]) for e in spans if e["name"].startswith("gloo:")] + c10d_iv)
    comm = _intersect(comm, [(t0, t1)])
    exposed = _minus(comm, compute)
    busy = _union(compute + comm)
    us = 1e-6
    parts = {name: _length(_intersect(compute, iv)) * us for name, iv in phases.items()}
    parts["exposed_comm"] = _length(exposed) * us
    parts["idle"] = max(0.0, (t1 - t0) - _length(busy)) * us
    return {
        "formula": PROFILE_FORMULA_VERSION,
        "wall_s": (t1 - t0) * us,
        "breakdown_s": {k: parts[k] for k in PARTS},
        "phase_wall_s": {k: _length(v) * us for k, v in phases.items()},
        "comm_s": _length(comm) * us,
        "overlapped_comm_s": (_length(comm) - _length(exposed)) * us,
        "collectives": _collectives(c10d),
        "top_ops": _top_ops(spans),
        "memory": _memory(events, t0, t1, device_type, before, after, saved, start_alloc),
        "timeline": _timeline(phases, compute, exposed, t0, t1),
    }


def _collectives(c10d: list[dict]) -> dict[str, dict[str, Any]]:
    """Outermost c10d ops (a dispatch may record one inside another), by kind."""
    c10d = sorted(c10d, key=lambda e: (e["ts"], -e["dur"]))
    out: dict[str, dict[str, Any]] = {}
    end = -1.0
    for e in c10d:
        if e["ts"] < end:
            continue  # nested in the previous collective
        end = e["ts"] + e["dur"]
        rule = _C10D.get(e["name"].removeprefix("c10d::"))
        if rule is None or rule[0] == "barrier":
            continue
        kind, where = rule
        args = e.get("args", {})
        dims, types = args.get("Input Dims", []), args.get("Input type", [])
        payload = _bytes_of(dims[where], types[where] if where < len(types) else "float") if where < len(dims) else 0
        c = out.setdefault(kind, {"calls": 0, "bytes": 0, "time_s": 0.0, "sizes": []})
        c["calls"] += 1
        c["bytes"] += payload
        c["time_s"] += e["dur"] * 1e-6
        c["sizes"].append(payload)
    for c in out.values():
        sizes = sorted(c.pop("sizes"))
        c["mean_bytes"] = c["bytes"] / c["calls"]
        c["min_bytes"], c["max_bytes"] = sizes[0], sizes[-1]
    return out


def _top_ops(spans: list[dict], n: int = 10) -> list[dict[str, Any]]:
    """Operators by self time (own duration minus their children's), per thread."""
    self_us: dict[str, float] = {}
    calls: dict[str, int] = {}
    by_tid: dict[Any, list[dict]] = {}
    for e in spans:
        if e.get("cat") in ("cpu_op", "kernel"):
            by_tid.setdefault((e["tid"], e.get("cat")), []).append(e)
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, child time]
        for e in evs + [None]:
            while stack and (e is None or e["ts"] >= stack[-1][0]):
                end, name, dur, child = stack.pop()
                self_us[name] = self_us.get(name, 0.0) + dur - child
                if stack:
                    stack[-1][3] += dur
            if e is not None:
                stack.append([e["ts"] + e["dur"], e["name"], e["dur"], 0.0])
                calls[e["name"]] = calls.get(e["name"], 0) + 1
    ranked = sorted(self_us.items(), key=lambda kv: -kv[1])[:n]
    return [{"name": k, "self_s": v * 1e-6, "calls": calls[k]} for k, v in ranked]


def _memory(events, t0, t1, device_type, before, after, saved, start_alloc) -> dict[str, Any]:
    want = 1 if device_type == "cuda" else 0
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("ph") == "i"
                  and e["args"].get("Device Type") == want and t0 <= e["ts"] <= t1), key=lambda e: e["ts"])
    # What the step starts with: state storages present before and after the
    # step (a gradient freed by zero_grad and re-made is a new allocation); on
    # CUDA the rest of the allocator's total is buffers. A free of a block not
    # known here (allocated before the profiler started) is not counted.
    live: dict[int, tuple[str | None, int]] = {ptr: v for ptr, v in before.items() if ptr in after}
    other = max(0, start_alloc - sum(n for _, n in live.values())) if start_alloc is not None else 0
    running = start = other + sum(n for _, n in live.values())
    peak, peak_i = start, -1
    for i, e in enumerate(mem):
        addr, nbytes = e["args"]["Addr"], e["args"]["Bytes"]
        if nbytes > 0:
            running += nbytes - live.get(addr, (None, 0))[1]
            live[addr] = (None, nbytes)
        elif addr in live:
            running -= live.pop(addr)[1]
        if running > peak:
            peak, peak_i = running, i
    live = {ptr: v for ptr, v in before.items() if ptr in after}
    for e in mem[: peak_i + 1]:
        addr, nbytes = e["args"]["Addr"], e["args"]["Bytes"]
        if nbytes > 0:
            live[addr] = (None, nbytes)
        else:
            live.pop(addr, None)
    at_peak = {"params": 0, "grads": 0, "optimizer": 0, "activations": 0, "buffers": other}
    for addr, (kind, nbytes) in live.items():
        if kind is None:
            kind = after[addr][0] if addr in after else "activations" if addr in saved else "buffers"
        at_peak[kind] += nbytes
    return {
        "peak_bytes": int(peak),
        "start_bytes": int(start),
        "at_peak": at_peak,
        "peak_at_s": (mem[peak_i]["ts"] - t0) * 1e-6 if peak_i >= 0 else 0.0,
        "method": ("cuda: allocator total at the start + the step's allocator events" if device_type == "cuda" else
                   "cpu: model state at the start + net allocations in the step (profiler memory events)")
                  + "; live blocks at the peak attributed by address: state_tensors() after the step, "
                    "autograd-saved storages (activations), the rest buffers",
    }


def _timeline(phases, compute, exposed, t0, t1) -> list[list]:
    """[part, start_s, end_s] segments relative to the step start, merged to at
    most ~TIMELINE_SEGMENTS (gaps shorter than wall/TIMELINE_SEGMENTS are closed)."""
    gap = (t1 - t0) / TIMELINE_SEGMENTS
    segs: list[list] = []
    for name, iv in phases.items():
        for a, b in _intersect(compute, iv):
            segs.append([name, a, b])
    segs += [["exposed_comm", a, b] for a, b in exposed]
    segs.sort(key=lambda s: (s[0], s[1]))
    merged: list[list] = []
    for s in segs:
        if merged and merged[-1][0] == s[0] and s[1] - merged[-1][2] < gap:
            merged[-1][2] = max(merged[-1][2], s[2])
        else:
            merged.append(list(s))
    return [[n, round((a - t0) * 1e-6, 7), round((b - t0) * 1e-6, 7)] for n, a, b in merged]
