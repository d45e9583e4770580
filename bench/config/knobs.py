"""The shared knob vocabulary (DESIGN.md) as one typed, validated model.

Every adapter and every suite speaks these names. ``Knobs`` validates one
cell's values and their cross-field constraints; errors name the field.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from impl.model_config import PRESETS
from impl.parallel_dims import ParallelDims

Adapter = Literal["inhouse", "torch", "deepspeed", "colossalai", "megatron"]
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved", "pipedream", "zbv", "zb1p", "dualpipev"]
Optimizer = Literal["adamw", "sgd", "adafactor", "adam8bit", "onebit_adam", "onebit_lamb", "lamb", "lars"]
Attention = Literal[
    "dense", "sliding_window", "dilated", "global", "random", "block_local", "longformer", "bigbird"
]
Fault = Literal["none", "raise", "hang", "oom", "memory_error", "segfault", "abort", "slow"]

class Knobs(BaseModel):
    """One fully described cell. Unknown names are rejected (with a suggestion)
    before this model sees them; see ``bench.config.suite``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    adapter: Adapter = "inhouse"
    model: str = "tiny"
    device: Literal["cpu", "cuda"] = "cpu"
    world_size: int = Field(default=1, strict=True, ge=1)
    dp: int | None = Field(default=None, strict=True, ge=1)
    tp: int = Field(default=1, strict=True, ge=1)
    cp: int = Field(default=1, strict=True, ge=1)
    """Context-parallel degree: ranks that split every sequence end to end
    (`sequence_parallel: ring`, ring self-attention over the cp group); composes
    with tp (the weights split over tp inside each cp rank) and dp."""
    pp: int = Field(default=1, strict=True, ge=1)
    tp_mode: Literal["1d", "2d", "2.5d", "3d"] = "1d"
    tp_depth: int = Field(default=1, strict=True, ge=1)
    sequence_parallel: Literal["none", "megatron", "ring"] = "none"
    microbatches: int = Field(default=1, strict=True, ge=1)
    pp_schedule: PipelineSchedule = "1f1b"
    virtual_stages: int = Field(default=1, strict=True, ge=1)
    """Model chunks per pipeline rank; `pp_schedule: interleaved` without it takes 2
    (torch pipelining's and Megatron's usual choice)."""
    pp_balance: Literal["params", "time"] = "params"
    """How the pipeline cuts blocks into stages: equal parameters, or equal forward+backward
    time measured once per piece before training (adapter inhouse only)."""
    zero: Literal[0, 1, 2, 3] = 0
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    checkpointing: Literal["none", "full", "selective"] = "none"
    checkpoint_every: int = Field(default=1, strict=True, ge=1)
    """With `checkpointing: full`, recompute every k-th block only (1 = all blocks)."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    optimizer: Optimizer = "adamw"
    lr: float | None = Field(default=None, gt=0, le=100)
    """The optimizer's learning rate, the same for every adapter; left out: the
    workload's 1e-3 for every optimizer. docs/convergence.md gives each
    optimizer's rate for runs that must train (suites/convergence.yaml)."""
    freeze_step: int = Field(default=10, strict=True, ge=1)
    """1-bit Adam/LAMB: full-precision warm-up steps before the variance is
    frozen and momentum is communicated compressed (DeepSpeed's `freeze_step`)."""
    fusion: Literal["none", "fused", "compile"] = "none"
    allreduce: Literal["backend", "ring", "tree", "ps", "ps_sharded"] = "backend"
    attention: Attention = "dense"
    attention_block: int = Field(default=64, strict=True, ge=1)
    """Sparse attention: tokens per block (the unit computed or skipped); seq_len must be a multiple."""
    attention_window: int = Field(default=1, strict=True, ge=0)
    """Sparse attention: band half-width in blocks (causal: blocks to the left); see impl/sparse_patterns.py."""
    batch_size: int = Field(default=8, strict=True, ge=1)
    seq_len: int = Field(default=64, strict=True, ge=1)
    strategy: Literal["manual", "auto", "fsdp1"] = "manual"
    """`auto`: the planner picks the degrees; `fsdp1`: the `torch` adapter shards
    with FSDP1 (FullyShardedDataParallel) instead of FSDP2."""
    workload: Literal["train", "allreduce", "attention"] = "train"
    """`train` trains the decoder; `allreduce` times one all-reduce of
    `message_bytes` per step with the `allreduce` algorithm (adapter inhouse);
    `attention` times one attention-core forward + backward per step at the
    model's head shape (bench/workloads/attention.py)."""
    message_bytes: int = Field(default=2**20, strict=True, ge=4, le=2**34)
    framework_config: Literal["default", "theory", "tuned"] = "default"
    """How each framework is configured: `default`, as its own docs recommend (exceptions
    recorded with their reason); `theory`, the settings that make its traffic match the
    paper's volume (theory-validation cells only); `tuned`, the best of a small documented
    search, one cell per candidate (bench/config/framework_config.py)."""
    tuning_candidate: int = Field(default=0, strict=True, ge=0)
    """With `framework_config: tuned`, which candidate of the tuning space this cell runs;
    a suite that leaves it out gets one cell per candidate."""
    fault: Fault = "none"
    """Test-only fault injection: raise, hang, oom (a real failed allocation),
    segfault, or slow (every timed step 20 % slower)."""

    @model_validator(mode="before")
    @classmethod
    def _ring_over_cp(cls, data: Any) -> Any:
        """Suites written before `cp` existed spelled ring self-attention as
        `tp: N, sequence_parallel: ring` (tp then meant the ring's size, weights
        replicated). Read them as `cp: N`, and say so."""
        if (isinstance(data, dict) and data.get("sequence_parallel") == "ring" and "cp" not in data
                and isinstance(data.get("tp"), int) and data["tp"] > 1):
            warnings.warn(f"tp = {data['tp']} with sequence_parallel = 'ring' is read as cp = {data['tp']}, tp = 1 "
                          "(the ring's size is the context-parallel degree `cp`; write `cp` instead)",
                          FutureWarning, stacklevel=2)
            data = {**data, "cp": data["tp"], "tp": 1}
        return data

    @field_validator("sequence_parallel", mode="before")
    @classmethod
    def _sp_aliases(cls, value: Any) -> Any:
        # DESIGN.md: `true` means megatron, `false` means none.
        if value is True:
            return "megatron"
        if value is False:
            return "none"
        return value

    @field_validator("zero", mode="before")
    @classmethod
    def _zero_is_an_int(cls, value: Any) -> Any:
        # Literal[0, 1, 2, 3] alone takes True as 1 and 2.0 as 2 (found by tests/test_fuzz_suites.py).
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"zero must be an integer stage 0-3, got {value!r}")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown model preset {value!r}; known: {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Knobs":
        dims = ParallelDims.derive(world_size=self.world_size, tp=self.tp, pp=self.pp, dp=self.dp, cp=self.cp)
        if self.dp is None:
            object.__setattr__(self, "dp", dims.dp)
        _check_tp_mode(self.tp, self.tp_mode, self.tp_depth)
        cfg = PRESETS[self.model]
        if self.tp_mode == "1d" and cfg.n_kv_heads % self.tp:
            raise ValueError(
                f"tp = {self.tp} does not divide the {cfg.n_kv_heads} key/value heads of model {self.model!r}"
            )
        if self.tp_mode in ("2d", "2.5d") and self.tp > 1:
            _check_tp2d(cfg, self.model, self.tp, self.tp_depth if self.tp_mode == "2.5d" else 1,
                        batch_size=self.batch_size, per_step=self.dp * self.microbatches)
        if self.tp_mode == "3d" and self.tp > 1:
            _check_tp3d(cfg, self.model, self.tp, batch_size=self.batch_size, per_step=self.dp * self.microbatches)
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len = {self.seq_len} exceeds max_seq_len = {cfg.max_seq_len} of {self.model!r}")
        per_step = self.dp * self.microbatches
        if self.workload == "train" and self.batch_size % per_step:
            raise ValueError(
                f"batch_size = {self.batch_size} is not divisible by dp*microbatches = {per_step} "
                f"(dp={self.dp} of world_size={self.world_size}, microbatches={self.microbatches})"
            )
        if self.pp_schedule == "interleaved" and self.pp > 1 and self.virtual_stages < 2:
            if "virtual_stages" in self.model_fields_set:
                raise ValueError("pp_schedule = 'interleaved' needs virtual_stages >= 2")
            object.__setattr__(self, "virtual_stages", 2)
        if self.pp * self.virtual_stages > cfg.n_layers:
            raise ValueError(
                f"pp*virtual_stages = {self.pp * self.virtual_stages} exceeds the {cfg.n_layers} layers of {self.model!r}"
            )
        if self.checkpoint_every > 1 and self.checkpointing != "full":
            raise ValueError(f"checkpoint_every = {self.checkpoint_every} needs checkpointing = 'full'")
        if self.checkpoint_every > cfg.n_layers:
            raise ValueError(f"checkpoint_every = {self.checkpoint_every} exceeds the {cfg.n_layers} layers of {self.model!r}")
        _check_tuning(self)
        _check_context_parallel(self.cp, self.sequence_parallel, self.tp_mode, self.seq_len)
        if self.sequence_parallel == "megatron" and self.tp < 2:
            raise ValueError("sequence_parallel = 'megatron' needs tp >= 2")
        if self.offload == "optimizer" and self.zero < 1:
            raise ValueError("offload = 'optimizer' needs zero >= 1 (ZeRO-Offload partitions the optimizer)")
        if self.offload == "optimizer+params" and self.zero != 3:
            raise ValueError("offload = 'optimizer+params' needs zero = 3")
        if self.pp_balance != "params" and (self.pp < 2 or self.adapter != "inhouse"):
            raise ValueError(f"pp_balance = {self.pp_balance!r} needs pp >= 2 and adapter 'inhouse' "
                             f"(got pp = {self.pp}, adapter = {self.adapter!r}); other adapters cut by their own rule")
        if self.pp > 1 and self.zero > 1:
            raise ValueError(f"zero = {self.zero} cannot be combined with pp = {self.pp} (only zero 0/1 with pipelines)")
        return self

    @model_validator(mode="after")
    def _workload(self) -> "Knobs":
        if self.attention != "dense" and self.seq_len % self.attention_block:
            raise ValueError(f"seq_len = {self.seq_len} is not a multiple of attention_block = {self.attention_block}")
        if self.workload == "attention" and (self.tp > 1 or self.pp > 1 or self.zero or self.dp != self.world_size):
            raise ValueError("workload = 'attention' times one attention core per rank: cp, tp, pp and zero must be off")
        if self.workload == "allreduce":
            if self.adapter != "inhouse":
                raise ValueError("workload = 'allreduce' times impl/allreduce.py: use adapter = 'inhouse' "
                                 "(allreduce = 'backend' is torch.distributed.all_reduce)")
            if self.tp > 1 or self.pp > 1 or self.cp > 1 or self.zero:
                raise ValueError("workload = 'allreduce' runs over all ranks: cp, tp, pp and zero must be off")
            if self.message_bytes % 4:
                raise ValueError(f"message_bytes = {self.message_bytes} must be a multiple of 4 (float32 elements)")
        return self

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(world_size=self.world_size, dp=self.dp, cp=self.cp, tp=self.tp, pp=self.pp)

    def resolved(self) -> dict[str, Any]:
        """Every knob with its resolved value, JSON-ready."""
        return self.model_dump(mode="json")


def _check_tuning(knobs: "Knobs") -> None:
    if knobs.tuning_candidate and knobs.framework_config != "tuned":
        raise ValueError(f"tuning_candidate = {knobs.tuning_candidate} needs framework_config = 'tuned'")
    if knobs.framework_config == "tuned":
        from bench.config.framework_config import tuning_space

        n = len(tuning_space(knobs))
        if knobs.tuning_candidate >= n:
            raise ValueError(f"tuning_candidate = {knobs.tuning_candidate}: the {knobs.adapter} tuning space of this "
                             f"cell has {n} candidate(s) (0..{n - 1})")


def _check_context_parallel(cp: int, sequence_parallel: str, mode: str, seq_len: int) -> None:
    """Context parallelism: the cp ranks split every sequence and pass K/V around
    a ring (ring self-attention, arXiv 2105.13120); tp, if any, is Megatron 1D TP."""
    if sequence_parallel == "ring" and cp < 2:
        raise ValueError("sequence_parallel = 'ring' needs cp >= 2 (the ring is the cp ranks, which split the sequence)")
    if cp > 1 and sequence_parallel != "ring":
        raise ValueError(f"cp = {cp} needs sequence_parallel = 'ring' (ring self-attention is the context-parallel "
                         f"attention), got sequence_parallel = {sequence_parallel!r}")
    if cp > 1 and mode != "1d":
        raise ValueError(f"cp = {cp} composes with 1D tensor parallelism only; tp_mode must be '1d', got {mode!r}")
    if cp > 1 and seq_len % cp:
        raise ValueError(f"seq_len = {seq_len} is not divisible by cp = {cp} (the cp ranks split the sequence)")


def _check_tp_mode(tp: int, mode: str, depth: int) -> None:
    """2D needs tp = q², 2.5D tp = q²·d, 3D tp = q³ (Colossal-AI's grids)."""
    if mode == "1d" or tp == 1:
        return
    if mode == "2d":
        q = math.isqrt(tp)
        if q * q != tp:
            raise ValueError(f"tp_mode = '2d' needs tp to be a square (q*q), got tp = {tp}")
    elif mode == "2.5d":
        if tp % depth:
            raise ValueError(f"tp_mode = '2.5d' needs tp = q*q*tp_depth, got tp = {tp}, tp_depth = {depth}")
        q = math.isqrt(tp // depth)
        if q * q * depth != tp:
            raise ValueError(f"tp_mode = '2.5d' needs tp = q*q*tp_depth, got tp = {tp}, tp_depth = {depth}")
    elif mode == "3d":
        q = round(tp ** (1 / 3))
        if q**3 != tp:
            raise ValueError(f"tp_mode = '3d' needs tp to be a cube (q*q*q), got tp = {tp}")


def _check_tp2d(cfg: Any, model: str, tp: int, depth: int, *, batch_size: int, per_step: int) -> None:
    """2D/2.5D TP (impl/tensor_parallel_2d.py) splits heads, features and the
    vocabulary by q, and each micro-batch's sequences into d·q blocks."""
    q = math.isqrt(tp // depth)
    where = f"tp_mode = '{'2.5d' if depth > 1 else '2d'}' with tp = {tp} (q = {q}, depth = {depth})"
    if q < 2:
        raise ValueError(f"{where}: the grid side q must be >= 2 (tp_depth alone is data parallelism)")
    for field, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("dim", cfg.dim),
                     ("ffn_dim", cfg.ffn_dim), ("vocab_size", cfg.vocab_size)):
        if n % q:
            raise ValueError(f"{where}: {field} = {n} of model {model!r} is not divisible by q = {q}")
    if batch_size % (per_step * depth * q):
        raise ValueError(f"{where}: batch_size = {batch_size} is not divisible by dp*microbatches*depth*q = "
                         f"{per_step * depth * q} (each micro-batch's sequences are split over depth and rows)")


def _check_tp3d(cfg: Any, model: str, tp: int, *, batch_size: int, per_step: int) -> None:
    """3D TP (impl/tensor_parallel_3d.py) splits heads and features by q, every
    weight's rows by q², and each micro-batch's sequences into q² blocks."""
    q = round(tp ** (1 / 3))
    where = f"tp_mode = '3d' with tp = {tp} (q = {q})"
    for field, n, by in (("n_heads", cfg.n_heads, q), ("n_kv_heads", cfg.n_kv_heads, q), ("dim", cfg.dim, q * q),
                         ("ffn_dim", cfg.ffn_dim, q * q), ("vocab_size", cfg.vocab_size, q * q),
                         ("n_heads*head_dim", cfg.n_heads * cfg.head_dim, q * q),
                         ("n_kv_heads*head_dim", cfg.n_kv_heads * cfg.head_dim, q * q)):
        if n % by:
            raise ValueError(f"{where}: {field} = {n} of model {model!r} is not divisible by {by}")
    if batch_size % (per_step * q * q):
        raise ValueError(f"{where}: batch_size = {batch_size} is not divisible by dp*microbatches*q² = "
                         f"{per_step * q * q} (each micro-batch's sequences are split into q² blocks)")


KNOB_NAMES: tuple[str, ...] = tuple(Knobs.model_fields)
_DEFAULTS = {name: field.default for name, field in Knobs.model_fields.items()}


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The knobs that make a cell what it is: resolved values that differ from
    their defaults. Cell ids and `bench compare` hash this, so adding a knob
    (with a default) to TrainBench leaves earlier ids and baselines matching."""
    return {k: v for k, v in config.items() if k not in _DEFAULTS or v != _DEFAULTS[k]}
