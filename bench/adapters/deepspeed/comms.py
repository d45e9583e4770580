"""DeepSpeed's own comms logger, read beside the harness's ``CommMeter``.

The logger (``deepspeed.comm.comms_logger``, enabled by the config's
``comms_logger`` block) records every op issued through ``deepspeed.comm``
in ``comms_dict[log_name][msg_size] = [count, latencies_ms, algbw_gbps,
busbw_gbps]``. This module turns it on for the harness's metered step only
(the one step a ``CommMeter`` is active around, the last warm-up step), and
summarises it into the record's notes as ``deepspeed_comms_logger``.

Definitions DeepSpeed uses (``deepspeed/utils/comms_logging.py``,
``calc_bw_log``), with n = the *world* size, not the op's group size:

* msg_size: bytes of the op's ``tensor`` argument — for all-gather the
  *input* shard, for reduce-scatter the *input* (full) tensor, for
  all-reduce / broadcast / send / recv the tensor.
* all-reduce: algbw = 2·size/t (nccl-tests: size/t), busbw = size/t·2(n−1)/n (as nccl-tests).
* all-gather(_into_tensor): algbw = n·size/t, busbw = algbw·(n−1)/n (as nccl-tests, size = output).
* reduce-scatter(_tensor): algbw = n·size/t, busbw = algbw·(n−1)/n — n× nccl-tests, whose
  size is the input, which msg_size already is.
* broadcast, send, recv, …: algbw = busbw = size/t.

Latencies: the logger times each op with a per-``log_name`` timer that it
never resets, so each recorded latency is the *running total* of all ops of
that name so far (``timers(log_name).elapsed(reset=False)``); DeepSpeed's
printed "total latency" sums these running totals and its bandwidths divide
by them. The timers are reset at the start of the window here, so the last
(largest) latency of a name is the true total time of that op in the step,
reported as ``time_s``; DeepSpeed's own figures are kept, labelled. Under
the harness's meter every collective is waited for, so these are completion
times (outside it an ``async_op`` would be timed at launch only).
"""
from __future__ import annotations

from typing import Any

from bench.config.knobs import Knobs

NOTES_KEY = "deepspeed_comms_logger"
CONFIG = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}

# DeepSpeed log name → (the harness meter's kind, meter payload ÷ msg_size as a
# function of n): the meter's payload is the all-gather output, the
# reduce-scatter input and otherwise the tensor (bench/meters/comm.py).
_KINDS: dict[str, tuple[str, Any]] = {
    "all_reduce": ("all_reduce", 1),
    "all_reduce_coalesced": ("all_reduce", 1),
    "inference_all_reduce": ("all_reduce", 1),
    "all_gather": ("all_gather", "n"),
    "all_gather_into_tensor": ("all_gather", "n"),
    "reduce_scatter": ("reduce_scatter", 1),
    "reduce_scatter_tensor": ("reduce_scatter", 1),
    "all_to_all_single": ("all_to_all", 1),
    "broadcast": ("broadcast", 1),
    "reduce": ("reduce", 1),
    "send": ("send", 1),
    "isend": ("send", 1),
    "recv": ("recv", 1),
    "irecv": ("recv", 1),
    "barrier": ("barrier", 0),
}

SEES_AND_MISSES = (
    "The logger sees ops issued through deepspeed.comm's Python wrappers only; anything called on "
    "torch.distributed directly, issued from C++, or by torch itself (DDP, DTensor, functional collectives) is "
    "invisible to it, while the harness meter counts at the c10d dispatcher. In this adapter's cells (ZeRO 0-3, "
    "offload, bf16, checkpointing, pipeline) every collective and p2p op goes through deepspeed.comm, so per kind "
    "its calls and payload equal the meter's (vs_meter). It misses the process group: ops are keyed by name and "
    "message size only, and its bandwidths use the world size as n (wrong for a dp or pipeline subgroup, e.g. "
    "a nonzero busbw for a 1-rank all-reduce). Its numbers are rank 0's."
)


def _logger():
    import deepspeed.comm.comm as ds_comm

    return ds_comm


def active_meter():
    """The harness's communication meter, when one is active around this call."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from bench.meters.comm import CommMeter

    return next((m for m in _get_current_dispatch_mode_stack() if isinstance(m, CommMeter)), None)


def _meter_totals(meter) -> dict[str, tuple[int, int]]:
    return {kind: (s.calls, s.bytes) for kind, s in meter.stats.items()}


class CommsLoggerWindow:
    """Context manager around each train step: DeepSpeed's comms logger records
    only during the metered step (the one a ``CommMeter`` is active around), and
    its summary replaces ``summary`` in place, the dict the adapter put in the
    record's notes (it stays empty if no step was metered). The timed steps run
    with the logger off (it synchronises the device after every op)."""

    def __init__(self, dp: int) -> None:
        self.dp = dp
        self.summary: dict[str, Any] = {}
        self._meter, self._meter_before = None, {}
        disable()

    def __enter__(self) -> "CommsLoggerWindow":
        self._meter = active_meter()
        if self._meter is not None:
            self._meter_before = _meter_totals(self._meter)
            ds = _logger()
            ds.comms_logger.reset_data()
            ds.timers.timers.clear()  # running-total timers: start from zero
            ds.configure(enabled=True, prof_all=True, verbose=False, debug=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._meter is None:
            return
        raw = _logger().comms_logger.get_raw_data()
        disable()
        after = _meter_totals(self._meter)
        meter = {k: (c - self._meter_before.get(k, (0, 0))[0], b - self._meter_before.get(k, (0, 0))[1])
                 for k, (c, b) in after.items()}
        self.summary.clear()
        self.summary.update(summarize(raw, self.dp, meter))
        self._meter = None


def disable() -> None:
    _logger().configure(enabled=False)


def summarize(raw: dict[str, dict[int, list]], n: int, meter: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Per-op totals of one window's ``comms_dict``, and per harness-meter kind
    beside the meter's (calls, payload bytes) in the same window. ``n`` is the
    all-gather group size (ZeRO gathers over the data-parallel group)."""
    ops: dict[str, Any] = {}
    by_kind: dict[str, dict[str, float]] = {}
    for name, sizes in sorted(raw.items()):
        calls = sum(v[0] for v in sizes.values())
        msg_bytes = sum(size * v[0] for size, v in sizes.items())
        latencies_ms = [lat for v in sizes.values() for lat in v[1]]
        time_s = max(latencies_ms, default=0.0) / 1e3
        kind, factor = _KINDS.get(name, (None, None))
        payload = None if kind is None else msg_bytes * (n if factor == "n" else factor)
        ops[name] = {
            "calls": calls,
            "msg_bytes": msg_bytes,
            "msg_sizes": {str(size): v[0] for size, v in sorted(sizes.items())},
            "payload_bytes": payload,
            "time_s": time_s,
            "time_s_as_logged": sum(latencies_ms) / 1e3,
            "algbw_gbps_deepspeed": _mean(v for s in sizes.values() for v in s[2]),
            "busbw_gbps_deepspeed": _mean(v for s in sizes.values() for v in s[3]),
            "meter_kind": kind,
        }
        if kind is not None:
            k = by_kind.setdefault(kind, {"calls": 0, "payload_bytes": 0})
            k["calls"] += calls
            k["payload_bytes"] += payload
    vs_meter = {}
    for kind in sorted(set(by_kind) | set(meter)):
        seen = by_kind.get(kind, {"calls": 0, "payload_bytes": 0})
        m_calls, m_bytes = meter.get(kind, (0, 0))
        vs_meter[kind] = {"logger_calls": seen["calls"], "meter_calls": m_calls,
                          "logger_payload_bytes": seen["payload_bytes"], "meter_bytes": m_bytes,
                          "unseen_by_logger_bytes": m_bytes - seen["payload_bytes"]}
    return {
        "window": "the harness's metered step (last warm-up step), rank 0, logger reset at its start",
        "ops": ops,
        "vs_meter": vs_meter,
        "definitions": {
            "msg_bytes": "sum of DeepSpeed's msg_size (bytes of the op's `tensor` argument: all-gather input shard, "
                         "reduce-scatter input) × count",
            "payload_bytes": "msg_bytes in the harness meter's payload terms (nccl-tests size): all-gather × n "
                             f"(output; n = {n}, the data-parallel group), others × 1. DeepSpeed's own bandwidths "
                             "use the world size as n whatever the op's group",
            "vs_meter": "per harness-meter kind, the logger's calls and payload_bytes beside the meter's calls and "
                        "bytes (metrics.comm) in the same window; equal where every op of the kind goes through "
                        "deepspeed.comm",
            "time_s": "total time of the op in the window: the largest of DeepSpeed's running-total latencies",
            "time_s_as_logged": "sum of DeepSpeed's recorded latencies (running totals: over-counts)",
            "algbw_gbps_deepspeed": "DeepSpeed calc_bw_log mean, Gbit/s over its running-total latencies; all-reduce "
                                    "2·size/t (twice nccl-tests), reduce-scatter n·size/t (n× nccl-tests)",
            "busbw_gbps_deepspeed": "DeepSpeed calc_bw_log mean, Gbit/s over its running-total latencies; nccl-tests "
                                    "bus factors except reduce-scatter (n× too large)",
        },
        "sees_and_misses": SEES_AND_MISSES,
    }


def _mean(values) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def comm_vs_theory(knobs: Knobs, *, recomputed_fraction: float = 0.0, persistent_fraction: float = 0.0) -> dict[str, Any]:
    """Why the measured volume differs from theory.dp_comm_elements, and by how much
    (bus bytes per rank per step; Ψ parameters, N ranks, m micro-batches).
    ``persistent_fraction``: the share of Ψ in ZeRO-3 parameters small enough to
    stay whole on every rank (stage3_param_persistence_threshold)."""
    if knobs.dp == 1:
        return {}
    m = knobs.microbatches
    if knobs.zero == 0:
        return {"comm_vs_theory": "gradients all-reduced once per step from one flat buffer "
                                  "(engine.allreduce_gradients): 2Ψ(N−1)/N, as theory",
                "comm_expected_ratio": 1.0}
    if knobs.zero in (1, 2):
        # ZeRO-1 reduces once at the boundary; ZeRO-2 from backward hooks every micro-batch.
        reductions = 1 if knobs.zero == 1 else m
        theory = 2 if knobs.zero == 1 else m + 1
        return {
            "comm_vs_theory": (
                "DeepSpeed 0.19.8 ZeRO-1/2 reduce each gradient bucket with an all-reduce and keep their own "
                "slice (zero_optimization.use_multi_rank_bucket_allreduce defaults to true), not a reduce-scatter: "
                f"{reductions} × 2Ψ(N−1)/N, then all-gather the updated parameters Ψ(N−1)/N; theory counts "
                f"{theory} × Ψ(N−1)/N. Plus one scalar all-reduce for the gradient norm."
            ),
            "comm_expected_ratio": (2 * reductions + 1) / theory,
        }
    if knobs.framework_config != "theory":
        return _zero3_defaults(persistent_fraction)
    text = ("each parameter all-gathered before its forward and again before its backward (framework_config: "
            "theory — persistence threshold 0, reuse distance 0, no prefetch), gradients reduce-scattered: "
            "3Ψ(N−1)/N per micro-batch, as theory. "
            "Plus a scalar all-reduce for the gradient norm and, on the step after DeepSpeed completes its module "
            "trace (the second), 6 small broadcasts checking the trace matches across ranks (~2 KB).")
    if recomputed_fraction:
        text += (f" Full checkpointing: backward's recompute gathers the blocks' parameters once more "
                 f"(+{recomputed_fraction:.3f}Ψ(N−1)/N).")
    return {"comm_vs_theory": text, "comm_expected_ratio": 1.0 + recomputed_fraction / 3}


def _zero3_defaults(persistent: float) -> dict[str, Any]:
    """ZeRO-3 with DeepSpeed's defaults (one micro-batch): gradients reduce-scattered (Ψ);
    persistent parameters all-gathered once per step, after the update rebuilds them whole
    (stage3.py ``_post_step``); the rest gathered before forward and at most once more
    before backward (prefetch and the reuse distance keep some gathered)."""
    g = 1.0 - persistent
    text = (f"DeepSpeed's ZeRO-3 defaults: parameters of at most stage3_param_persistence_threshold = 1e5 elements "
            f"({persistent:.0%} of Ψ here) stay whole on every rank: never gathered for forward or backward, only "
            f"once per step after the update (stage3 _post_step); the other {g:.0%} are gathered before forward and, "
            "unless the 5e7-element prefetch or the 1e9 reuse distance keeps them, again before backward; gradients "
            f"are reduce-scattered (Ψ). Gathered: Ψ (each parameter once) to (1 + {g:.3f})Ψ, where theory (ZeRO §7.2.2) "
            f"gathers 2Ψ: 3Ψ(N−1)/N in all. Expected: 2/3 to (2 + {g:.3f})/3 of theory, plus a scalar all-reduce and "
            "~2 KB of trace-check broadcasts.")
    out: dict[str, Any] = {"comm_vs_theory": text, "comm_expected_ratio_range": [2 / 3, (2 + g) / 3]}
    if g == 0:
        out["comm_expected_ratio"] = 2 / 3
    return out
