"""A machine profile: what the cost model needs to know about the hardware.

Measured by ``calibrate.py`` on the target machine (CPU here) and stored as
JSON; for GPU targets without one, ``default_gpu_profile`` fills it from the
peak table in ``bench.meters.throughput`` and a documented default α–β, and
says so (``source``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROFILE_VERSION = 3
"""2: per-layer compute and optimizer profiles (``layers``, ``optimizer_s_per_param``), overlap fraction;
3: the in-place TP all-reduce timed with the sharded block run back to back (``layer_profile.time_tp_call``),
ZeRO-2/3 timed in place (``layer_profile.time_zero``), layer shapes in interleaved rounds."""

# Default α–β for GPUs without a calibrated profile (not measured; labelled as
# such in every plan): NVLink inside a node, InfiniBand/RoCE across nodes.
# Orders of magnitude from nccl-tests on 8×H100 (all-reduce busbw ~ 360 GB/s;
# we take a conservative 150 GB/s) and 400 Gb/s NICs (~ 45 GB/s; we take 25).
DEFAULT_GPU_ALPHA_BETA = {"intra_node": (10e-6, 150e9), "inter_node": (30e-6, 25e9)}
DEFAULT_GPU_EFFICIENCY = 0.5
"""Fraction of the table's dense peak a well-tuned large matmul reaches (MFU-like)."""
DEFAULT_GPUS_PER_NODE = 8


@dataclass(kw_only=True, slots=True)
class AlphaBeta:
    """t = alpha_s + bus_bytes / beta_bytes_per_s for one collective kind and group size."""

    alpha_s: float
    beta_bytes_per_s: float

    def time_s(self, bus_bytes: float, calls: int = 1) -> float:
        if calls <= 0:
            return 0.0
        return calls * self.alpha_s + bus_bytes / self.beta_bytes_per_s


@dataclass(kw_only=True, slots=True)
class MachineProfile:
    host: str
    device: str
    """`cpu`, or the GPU's name (matched against the peak table)."""
    source: str
    """`measured: …` or `default: …` — printed with every plan."""
    cores: int = 1
    matmul_flops: dict[str, float] = field(default_factory=dict)
    """FLOP/s of one rank's fp32 (rows × width) @ (width × width) matmul while
    ``ranks`` processes share the machine (cores ÷ ranks threads each), keyed
    "ranks:rows:width" (CPU); GPUs use ``peak_flops`` × efficiency."""
    peak_flops: float | None = None
    efficiency: float = 1.0
    mem_bandwidth_bytes_per_s: float = 10e9
    """Streaming bandwidth for the optimizer step (read/write of the state)."""
    host_bandwidth_bytes_per_s: float = 10e9
    """Device ↔ host copies (offload); on CPU the same memory."""
    op_overhead_s: float = 0.0
    """Fixed cost of one small autograd op (framework overhead; dominates tiny models on CPU)."""
    comm: dict[str, dict[str, float]] = field(default_factory=dict)
    """"kind:group_size" → {alpha_s, beta_bytes_per_s}; kinds all_reduce, all_gather, reduce_scatter, p2p."""
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    """``layer_profile.layer_key`` ("model:seq:ranks:tp:b") → seconds of one micro-batch's
    pieces on one rank: block_fwd_s, block_bwd_s, core_fwd_s, embed_s, head_s (measured)."""
    optimizer_s_per_param: dict[str, float] = field(default_factory=dict)
    """``layer_profile.optimizer_key`` ("optimizer:model:ranks:layout") → step seconds per parameter."""
    overlap: dict[str, float] = field(default_factory=dict)
    """"ranks" → fraction of an asynchronous collective that hides behind compute
    running at the same time (``calibrate.overlap_fraction``); absent: 1 (a GPU's
    separate copy engines / SMs; not measured)."""
    blocking_extra_s: dict[str, float] = field(default_factory=dict)
    """"ranks" → seconds a blocking collective between compute costs beyond its α–β
    (``calibrate.blocking_extra``: ranks arrive skewed); absent: 0 (not measured)."""
    version: int = PROFILE_VERSION

    def layer(self, model: str, seq_len: int, ranks: int, tp: int, b: int) -> dict[str, float] | None:
        from bench.plan.layer_profile import layer_key

        return self.layers.get(layer_key(model, seq_len, ranks, tp, b))

    def optimizer_rate(self, optimizer: str, model: str, ranks: int, layout: str) -> float | None:
        from bench.plan.layer_profile import optimizer_key

        return self.optimizer_s_per_param.get(optimizer_key(optimizer, model, ranks, layout))

    def overlap_fraction(self, ranks: int) -> float:
        if not self.overlap:
            return 1.0
        return self.overlap[min(self.overlap, key=lambda n: abs(int(n) - ranks))]

    def blocking_extra(self, ranks: int) -> float:
        if not self.blocking_extra_s:
            return 0.0
        return self.blocking_extra_s[min(self.blocking_extra_s, key=lambda n: abs(int(n) - ranks))]

    def alpha_beta(self, kind: str, group: int) -> AlphaBeta:
        """The fitted α–β for this kind and group size; an uncalibrated size takes
        the nearest calibrated one with α scaled by (n−1)/(n₀−1) (a ring takes n−1
        latency-bound hops) and the same bus bandwidth."""
        if self.device != "cpu" and not self.comm:
            alpha, beta = DEFAULT_GPU_ALPHA_BETA["intra_node" if group <= self.gpus_per_node else "inter_node"]
            return AlphaBeta(alpha_s=alpha * max(1, group - 1), beta_bytes_per_s=beta)
        sizes = sorted(int(k.split(":")[1]) for k in self.comm if k.split(":")[0] == kind)
        if not sizes:
            raise ValueError(f"machine profile {self.host} has no {kind} calibration")
        near = min(sizes, key=lambda n: abs(math.log(n) - math.log(group)))
        fit = self.comm[f"{kind}:{near}"]
        hops = 1.0 if kind == "p2p" else max(1, group - 1) / max(1, near - 1)
        return AlphaBeta(alpha_s=fit["alpha_s"] * hops, beta_bytes_per_s=fit["beta_bytes_per_s"])

    def throughput(self, ranks: int, rows: float, width: float) -> float:
        """FLOP/s of a (rows × width) @ (width × width) matmul on one rank:
        bilinear interpolation in log(rows), log(width) over the probe grid
        (clamped at its edges); GPUs: peak × efficiency."""
        if self.peak_flops is not None and not self.matmul_flops:
            return self.peak_flops * self.efficiency
        grid: dict[int, dict[tuple[int, int], float]] = {}
        for key, value in self.matmul_flops.items():
            t, r, w = (int(x) for x in key.split(":"))
            grid.setdefault(t, {})[(r, w)] = value
        t = min(grid, key=lambda n: (abs(math.log(n) - math.log(ranks)), n))
        pts = grid[t]
        rs, ws = sorted({r for r, _ in pts}), sorted({w for _, w in pts})

        def bracket(xs: list[int], x: float) -> tuple[int, int, float]:
            x = min(max(x, xs[0]), xs[-1])
            for lo, hi in zip(xs, xs[1:]):
                if lo <= x <= hi:
                    return lo, hi, (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return xs[0], xs[0], 0.0

        r0, r1, fr = bracket(rs, rows)
        w0, w1, fw = bracket(ws, width)
        lg = {k: math.log(v) for k, v in pts.items()}
        top = lg[(r0, w0)] * (1 - fr) + lg[(r1, w0)] * fr
        bottom = lg[(r0, w1)] * (1 - fr) + lg[(r1, w1)] * fr
        return math.exp(top * (1 - fw) + bottom * fw) * self.efficiency

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        return path

    @staticmethod
    def stored_version(path: str | Path) -> int | None:
        return json.loads(Path(path).read_text()).get("version")

    @classmethod
    def load(cls, path: str | Path) -> "MachineProfile":
        data = json.loads(Path(path).read_text())
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"{path}: machine profile version {data.get('version')} != {PROFILE_VERSION}; recalibrate")
        return cls(**data)


def default_gpu_profile(device_name: str, gpus_per_node: int = DEFAULT_GPUS_PER_NODE) -> MachineProfile:
    """A GPU profile from the peak table and the default α–β: no measurement."""
    from bench.meters.throughput import gpu_peak_flops

    peak = gpu_peak_flops(device_name)
    if peak is None:
        from bench.meters.throughput import PEAK_FLOPS

        raise ValueError(f"no peak FLOP/s for GPU {device_name!r} (known: {', '.join(PEAK_FLOPS)}); "
                         "calibrate a profile on it or pass --gpu-type")
    alpha_i, beta_i = DEFAULT_GPU_ALPHA_BETA["intra_node"]
    alpha_x, beta_x = DEFAULT_GPU_ALPHA_BETA["inter_node"]
    return MachineProfile(
        host="default", device=device_name, peak_flops=peak, efficiency=DEFAULT_GPU_EFFICIENCY,
        mem_bandwidth_bytes_per_s=2e12, host_bandwidth_bytes_per_s=25e9, op_overhead_s=5e-6,
        gpus_per_node=gpus_per_node,
        source=(f"default, not measured: {device_name} bf16 dense peak {peak / 1e12:.0f} TFLOP/s × "
                f"{DEFAULT_GPU_EFFICIENCY} efficiency; α–β intra-node {alpha_i * 1e6:.0f} µs + bytes/"
                f"{beta_i / 1e9:.0f} GB/s, inter-node {alpha_x * 1e6:.0f} µs + bytes/{beta_x / 1e9:.0f} GB/s "
                f"(α × (n−1) per ring); HBM 2 TB/s, PCIe 25 GB/s"),
    )
