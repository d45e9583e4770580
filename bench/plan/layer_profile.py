"""Per-layer compute profile of the decoder on this machine (Galvatron's layer
profiling; Miao et al. 2022 §4): what the cost model's compute term reads
instead of FLOPs ÷ a matmul probe when it is there.

One tiny model on a CPU is dominated by what FLOPs do not count: autograd's
per-op cost, element-wise kernels, the loss's softmax, a micro-batch's smaller
matmuls. So the model's own pieces are timed, at the shapes a plan runs them,
in as many concurrent processes as the plan has ranks on the machine (cores ÷
ranks threads each, as training runs):

* one ``impl.model.Block`` forward and backward on a (b, s, dim) micro-batch,
  built with the local shapes of a Megatron TP rank (heads ÷ t, ffn ÷ t; the
  norms replicated): the rank's compute without its all-reduces, which the
  cost model adds from the α–β fits;
* the attention core's forward alone (selective recompute re-runs it);
* the embedding forward + backward, and final norm + head (vocab ÷ t) + loss
  (with t > 1 the vocab-parallel embedding and cross-entropy, whose masks and
  reductions cost twice a plain loss here);
* with t > 1, one activation all-reduce in place (``time_tp_call``): a real
  sharded block on the plan's TP group against the local one;
* for ZeRO-2/3 plans, what ``impl.zero`` adds to a micro-batch in place
  (``time_zero``): a one-block decoder under ZeRO against the same without it;
* the optimizer step per parameter, over the model's tensors (DDP / no DP
  steps each parameter) and over flat per-unit buffers (ZeRO steps shards).

Entries are keyed ``model:seq:ranks:tp:b`` in ``MachineProfile.layers`` and
``optimizer:model:ranks:layout`` in ``MachineProfile.optimizer_s_per_param``;
``ensure_layer_profile`` measures the missing ones (one torchrun, ~5–20 s on
2 cores) and saves the profile. Each figure is the median over ``ROUNDS``
interleaved rounds of the median over repeats of the mean over ranks.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

PROFILED_OPTIMIZERS = ("adamw", "sgd")
"""Optimizers timed directly (torch's, which the in-house adapter uses); others fall back to streaming bytes."""
REPEATS = 5
ROUNDS = 3
"""Rounds over all shapes; each figure is the median of its rounds (this 2-core VM's speed drifts by 10–40 %
between seconds, and one slow spell during one shape's repeats had put the TP block at twice its time)."""


def layer_key(model: str, seq_len: int, ranks: int, tp: int, b: int) -> str:
    return f"{model}:{seq_len}:{ranks}:{tp}:{b}"


def zero_probed(knobs: Any) -> bool:
    """Whether a plan's ZeRO traffic is timed in place (``time_zero``): ZeRO-2/3
    sharded over every rank (the in-house adapter has no ZeRO with tp or pp)."""
    return knobs.zero >= 2 and knobs.dp >= 2 and knobs.dp == knobs.world_size


def zero_key(stage: int) -> str:
    """The layer-entry field of ZeRO-``stage``'s in-place seconds per micro-batch of the probe (``time_zero``)."""
    return f"zero{stage}_probe_s"


def optimizer_key(optimizer: str, model: str, ranks: int, layout: str) -> str:
    return f"{optimizer}:{model}:{ranks}:{layout}"


class LocalBlockConfig:
    """What ``impl.model.Block`` reads from a config, for the block one Megatron
    TP rank computes: the model's width and head width, heads and ffn columns ÷ t
    (a ``ModelConfig`` with fewer heads would widen each head instead)."""

    def __init__(self, cfg: Any, tp: int) -> None:
        self.dim, self.head_dim, self.norm_eps = cfg.dim, cfg.head_dim, cfg.norm_eps
        self.n_heads, self.n_kv_heads, self.ffn_dim = cfg.n_heads // tp, cfg.n_kv_heads // tp, cfg.ffn_dim // tp


def _median_time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_pieces(cfg: Any, seq_len: int, tp: int, b: int, repeats: int = REPEATS, *,
                alone: Any = None) -> dict[str, float]:
    """Seconds of each piece of one micro-batch of ``b`` sequences on one TP rank;
    with tp > 1, ``alone`` is a process group of this rank only (the
    vocab-parallel embedding and loss run their reductions on it)."""
    import torch

    from impl.model import Block, lm_loss, rope_tables

    local = LocalBlockConfig(cfg, tp)
    torch.manual_seed(0)
    block = Block(local)
    cos, sin = rope_tables(cfg.head_dim, seq_len, cfg.rope_theta)
    x = torch.randn(b, seq_len, cfg.dim, requires_grad=True)
    grad = torch.randn(b, seq_len, cfg.dim)
    out: dict[str, float] = {}

    def forward() -> torch.Tensor:
        return block(x, cos, sin)

    out["block_fwd_s"] = _median_time(forward, repeats)
    holder: dict[str, torch.Tensor] = {}

    def backward() -> None:  # the forward is outside the clock: one graph per call
        holder["y"].backward(grad)

    times = []
    for i in range(repeats + 1):
        holder["y"] = forward()
        start = time.perf_counter()
        backward()
        if i:
            times.append(time.perf_counter() - start)
    out["block_bwd_s"] = statistics.median(times)
    q = torch.randn(b, local.n_heads, seq_len, cfg.head_dim, requires_grad=True)
    out["core_fwd_s"] = _median_time(lambda: block.attention.core(q, q, q), repeats)

    if tp > 1:  # the vocab-parallel pieces' own ops (masks, the loss's three reductions) on a 1-rank group
        from impl.tensor_parallel import VocabParallelEmbedding
        from impl.tp_comm import vocab_parallel_cross_entropy

        emb = VocabParallelEmbedding(torch.randn(cfg.vocab_size // tp, cfg.dim), start=0, group=alone)

        def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return vocab_parallel_cross_entropy(logits, targets, vocab_start=0, group=alone)
    else:
        emb, loss = torch.nn.Embedding(cfg.vocab_size, cfg.dim), lm_loss
    tokens = torch.randint(0, cfg.vocab_size, (b, seq_len))
    out["embed_s"] = _median_time(lambda: emb(tokens).sum().backward(), repeats)
    norm = block.ffn_norm
    head = torch.nn.Linear(cfg.dim, cfg.vocab_size // tp, bias=False)
    targets = torch.randint(0, cfg.vocab_size, (b, seq_len))
    out["head_s"] = _median_time(lambda: loss(head(norm(x)), targets).backward(), repeats)
    return out


def time_tp_call(cfg: Any, seq_len: int, tp: int, b: int, group: Any, repeats: int = 3 * REPEATS) -> float:
    """Seconds one blocking activation all-reduce of a Megatron block costs in
    place: a real ``apply_tensor_parallel`` block on ``group`` (2 all-reduces in
    forward, 2 in backward) run back to back, as a model's blocks run, against
    the local-shape block without them, also back to back: the difference of
    the medians ÷ 4. It is the collective plus the wait for the later rank,
    which an idle-ranks α–β misses. (Timed in alternation, each sharded step's
    first all-reduce also absorbed the ranks' drift over the unsynchronised
    local step before it, which no training step has.)"""
    import dataclasses

    import torch

    from impl.model import Block, Decoder, rope_tables
    from impl.tensor_parallel import apply_tensor_parallel

    torch.manual_seed(0)
    decoder = Decoder(dataclasses.replace(cfg, n_layers=1))
    apply_tensor_parallel(decoder, group=group)
    sharded, local = decoder.layers[0], Block(LocalBlockConfig(cfg, tp))
    cos, sin = rope_tables(cfg.head_dim, seq_len, cfg.rope_theta)
    x = torch.randn(b, seq_len, cfg.dim, requires_grad=True)
    grad = torch.randn(b, seq_len, cfg.dim)

    local_s = _median_time(lambda: local(x, cos, sin).backward(grad), repeats)
    # its warm-up call also brings the ranks into step
    sharded_s = _median_time(lambda: sharded(x, cos, sin).backward(grad), repeats)
    return max(0.0, sharded_s - local_s) / 4


ZERO_PROBE_LAYERS = 1
"""The ZeRO probe's decoder: embedding, one block, norm + head (3 units, as ``impl.zero.decoder_units`` cuts them)."""


def time_zero(cfg: Any, seq_len: int, stage: int, b: int, group: Any, repeats: int = 3 * REPEATS) -> float:
    """Seconds ZeRO-``stage`` (``impl.zero``, stage 2 or 3) adds to one
    micro-batch's forward and backward in place: a one-block decoder of this
    model under ``apply_zero`` on ``group`` (stage 3: each unit's all-gather
    before its forward and again before its backward, prefetching the next;
    both stages: each unit's reduce-scatter launched from its gradient hook, at
    most ``MAX_INFLIGHT_RS`` in flight) run back to back, against the same
    decoder without ZeRO, also back to back: the difference of the medians.
    On a GPU the collectives run beside the compute; on a CPU gloo's copies and
    sums need the cores the ranks compute on, and each wait also waits for the
    later rank: what is left of the α–β traffic after overlap, measured."""
    import dataclasses

    import torch

    from impl.model import Decoder, lm_loss
    from impl.zero import apply_zero

    one = dataclasses.replace(cfg, n_layers=ZERO_PROBE_LAYERS)
    torch.manual_seed(0)
    plain, sharded = Decoder(one), Decoder(one)
    zero = apply_zero(sharded, stage=stage, group=group)
    tokens = torch.randint(0, cfg.vocab_size, (b, seq_len))
    targets = torch.randint(0, cfg.vocab_size, (b, seq_len))

    def plain_step() -> None:
        plain.zero_grad(set_to_none=True)
        lm_loss(plain(tokens), targets).backward()

    def zero_step() -> None:
        zero.zero_grad()
        lm_loss(sharded(tokens), targets).backward()  # the reduce-scatters finish inside (end-of-backward hook)

    return max(0.0, _median_time(zero_step, repeats) - _median_time(plain_step, repeats))


def time_optimizer(cfg: Any, optimizer: str, layout: str, repeats: int = REPEATS) -> float:
    """Seconds per parameter of one optimizer step over the model's parameters,
    as its own tensors (``layout="tensors"``) or as ZeRO's flat per-unit buffers (``"flat"``)."""
    import torch

    from impl.model_config import param_shapes

    shapes = list(param_shapes(cfg).values())
    if layout == "flat":  # impl.zero.decoder_units: embedding, each block, norm + head
        per_block = sum(math.prod(s) for s in shapes[1:-2]) // cfg.n_layers
        sizes = [math.prod(shapes[0])] + [per_block] * cfg.n_layers + [math.prod(shapes[-1]) + cfg.dim]
        params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    else:
        params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    else:
        raise ValueError(f"optimizer {optimizer!r} is not profiled (only {', '.join(PROFILED_OPTIMIZERS)})")
    return _median_time(opt.step, repeats) / sum(p.numel() for p in params)


def _worker(spec_path: str, out_path: str) -> None:
    """Under torchrun: every rank times every piece at once (barriers between
    pieces); rank 0 writes the mean over ranks."""
    import torch
    import torch.distributed as dist

    from impl.model_config import PRESETS

    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    spec = json.loads(Path(spec_path).read_text())
    cfg = PRESETS[spec["model"]]
    alone = [dist.new_group([r]) for r in range(n)][rank]
    tp_groups = {tp: [dist.new_group(list(range(g, g + tp))) for g in range(0, n, tp)][rank // tp]
                 for tp in sorted({tp for tp, _ in spec["shapes"] if tp > 1})}  # neighbouring ranks, as ParallelDims
    zero_stages: dict[int, list[int]] = {}
    for stage, b in spec.get("zero_shapes", []):
        zero_stages.setdefault(b, []).append(stage)
    rounds: dict[str, list[dict[str, float]]] = {}
    for _ in range(ROUNDS):  # shapes interleaved: a slow spell of the machine spoils one round of each, not one shape
        for tp, b in spec["shapes"]:
            dist.barrier()
            pieces = time_pieces(cfg, spec["seq_len"], tp, b, alone=alone)
            if tp > 1:
                dist.barrier()
                pieces["tp_call_s"] = time_tp_call(cfg, spec["seq_len"], tp, b, tp_groups[tp])
            for stage in zero_stages.get(b, []) if tp == 1 else []:
                dist.barrier()
                pieces[zero_key(stage)] = time_zero(cfg, spec["seq_len"], stage, b, dist.group.WORLD)
            rounds.setdefault(layer_key(spec["model"], spec["seq_len"], n, tp, b), []).append(pieces)
    results = {k: {p: statistics.median(r[p] for r in rs) for p in rs[0]} for k, rs in rounds.items()}
    optim: dict[str, float] = {}
    for name in spec["optimizers"]:
        for layout in ("tensors", "flat"):
            dist.barrier()
            optim[optimizer_key(name, spec["model"], n, layout)] = time_optimizer(cfg, name, layout)
    gathered: list[Any] = [None] * n
    dist.all_gather_object(gathered, {"layers": results, "optimizer": optim})
    if rank == 0:
        layers = {k: {p: statistics.fmean(g["layers"][k][p] for g in gathered) for p in v} for k, v in results.items()}
        opt = {k: statistics.fmean(g["optimizer"][k] for g in gathered) for k in optim}
        Path(out_path).write_text(json.dumps({"layers": layers, "optimizer": opt}))
    dist.destroy_process_group()


def measure(model: str, seq_len: int, ranks: int, shapes: Iterable[tuple[int, int]],
            optimizers: Iterable[str], timeout_s: float = 300, zero_shapes: Iterable[tuple[int, int]] = ()
            ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Run the worker under torchrun with ``ranks`` processes; (layer entries, optimizer entries).
    ``zero_shapes`` are (ZeRO stage, b) pairs whose (tp 1, b) entry also gets ``time_zero``."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"model": model, "seq_len": seq_len, "shapes": sorted(set(shapes)),
                                    "zero_shapes": sorted(set(zero_shapes)), "optimizers": sorted(set(optimizers))}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "bench.plan.layer_profile", str(spec), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"layer profiling of {model} at {ranks} ranks failed:\n{proc.stderr[-2000:]}")
        data = json.loads(out.read_text())
    return data["layers"], data["optimizer"]


def _complete(entry: dict[str, float] | None, tp: int, zero_stages: Iterable[int] = ()) -> bool:
    """An entry has its TP rank's in-place all-reduce (tp > 1) and the in-place
    cost of every ZeRO stage asked for (tp = 1)."""
    return entry is not None and (tp == 1 or "tp_call_s" in entry) and all(zero_key(z) in entry for z in zero_stages)


def ensure_layer_profile(profile: Any, *, model: str, seq_len: int, ranks: int,
                         shapes: Iterable[tuple[int, int]], optimizer: str,
                         save_to: str | Path | None = None, zero_shapes: Iterable[tuple[int, int]] = ()) -> bool:
    """Measure the (tp, b) shapes, the (ZeRO stage, b) in-place costs and the
    optimizer the profile lacks for this model, sequence and rank count; store
    them in ``profile`` (and ``save_to``). True when something was measured.
    CPU profiles only: a GPU target without its own calibration keeps the
    FLOP-based compute model."""
    if profile.device != "cpu":
        return False
    zero_shapes = set(zero_shapes)
    stages = {b: {z for z, zb in zero_shapes if zb == b} for _, b in zero_shapes}
    wanted = set(shapes) | {(1, b) for b in stages}
    missing = [(tp, b) for tp, b in wanted if not _complete(
        profile.layers.get(layer_key(model, seq_len, ranks, tp, b)), tp, stages.get(b, ()) if tp == 1 else ())]
    optimizers = [optimizer] if optimizer in PROFILED_OPTIMIZERS and \
        optimizer_key(optimizer, model, ranks, "flat") not in profile.optimizer_s_per_param else []
    if not missing and not optimizers:
        return False
    zero_missing = [(z, b) for z, b in zero_shapes if (1, b) in missing]
    layers, optim = measure(model, seq_len, ranks, missing or [next(iter(wanted))], optimizers,
                            zero_shapes=zero_missing)
    profile.layers.update(layers)
    profile.optimizer_s_per_param.update(optim)
    if save_to is not None:
        profile.save(save_to)
    return True


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
