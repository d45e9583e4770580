"""The inhouse adapter's pipeline plan: ``impl/pipeline.py`` + ``impl/pipeline_schedules.py``.

Ranks form a dp × pp grid (tp = 1): pipeline rank = (rank // tp) % pp, as in
``ParallelDims.coords``; each data-parallel replica is one pipeline over
``pp`` consecutive ranks. Blocks are cut into pp·v stages balanced by
parameter count (``pp_balance: params``; stage 0 counts the embedding, the
last the head) or by forward+backward time (``pp_balance: time``: rank 0
times every block, the embedding and the head + loss once on one
micro-batch and broadcasts the cut, so every rank builds the same stages).

Synchronous schedules (GPipe, 1F1B, interleaved) scale each micro-batch's
loss by 1/m, all-reduce the gradients across replicas after the flush and
step once: a step equals the single-process full-batch step. PipeDream steps
after every micro-batch (see ``impl.pipeline_schedules``).

Record notes: the schedule, the partition, and per rank the most micro-batches
whose activations were held at once and the step timelines. The bubble
(``impl.pipeline_bubble``): measured = Σ_r (T − busy_r) ÷ Σ_r busy_r with T
stage 0's span, median over the steps after the first; beside it (p−1)/m
((p−1)/(v·m) interleaved) and the theory for the measured stage times (the
same orders replayed with each stage's median forward/backward time and free
communication), each with measured ÷ theory. Rank 0 writes
the record, so the other ranks publish their figures through the job's
rendezvous store (a key–value side channel that the communication meter does
not see, keeping the metered traffic exactly the pipeline's own).
"""
from __future__ import annotations

import json
import statistics

import torch
import torch.distributed as dist

from bench.adapters.base import TrainStep
from bench.adapters.inhouse.optimizers import NOTES, make_optimizer
from bench.config.knobs import Knobs
from bench.theory import bubble_fraction
from bench.workloads.train import Batch
from impl.model import Decoder, lm_loss
from impl.parallel_dims import ParallelDims, new_grid_groups
from impl.pipeline import P2P, build_stages, measure_piece_times, partition_layers, partition_model
from impl.pipeline_bubble import bubble, replay_bubble, span_s
from impl.pipeline_schedules import SCHEDULES, PipelineRank, allreduce_mean_grads, sync_order
from impl.tensor_parallel import apply_tensor_parallel

INHOUSE_SCHEDULES = ("gpipe", "1f1b", "interleaved", "pipedream")
RECENT = 8  # steps whose op durations each rank publishes: the bubble is a median over these


def why_not_pipeline(knobs: Knobs) -> str | None:
    """Combinations the in-house pipeline does not compose (None when it runs)."""
    if knobs.pp_schedule not in INHOUSE_SCHEDULES:
        return None  # the capability table answers (zbv, …)
    name = f"pipeline_{knobs.pp_schedule}"
    if knobs.tp > 1 and (knobs.pp_schedule == "pipedream" or knobs.pp_balance != "params"):
        return (f"{name}: tp = {knobs.tp} with pp composes with the synchronous schedules (gpipe, 1f1b, "
                f"interleaved) cut by parameters; PipeDream's weight stash and the timing pass would run "
                f"the tensor-parallel collectives outside the schedule")
    if knobs.zero:
        return f"{name}: zero = {knobs.zero} with pp is not composed (stages step a plain optimizer)"
    if knobs.precision != "fp32":
        return f"{name}: precision = {knobs.precision} with pp is not composed (stages exchange fp32 hidden states)"
    if knobs.checkpointing != "none" or knobs.fusion != "none":
        return f"{name}: checkpointing/fusion with pp are not composed yet"
    if knobs.optimizer.startswith("onebit"):
        return f"{name}: 1-bit optimizers do their own data-parallel all-reduce; not composed with pp"
    if knobs.allreduce != "backend":
        return f"{name}: allreduce = {knobs.allreduce} with pp is not composed (stages all-reduce with the backend)"
    if knobs.pp_schedule == "pipedream" and knobs.dp > 1:
        return (f"{name}: dp = {knobs.dp} replicas would all-reduce after every micro-batch update; "
                f"wired but not yet checked against a simulation, so not offered")
    if knobs.pp_schedule != "interleaved" and knobs.virtual_stages > 1:
        return f"{name}: virtual_stages > 1 needs pp_schedule 'interleaved'"
    if knobs.pp_schedule == "interleaved" and knobs.microbatches % knobs.pp:
        return (f"{name}: interleaved 1F1B needs microbatches ({knobs.microbatches}) divisible by "
                f"pp ({knobs.pp}) (Megatron-LM's schedule)")
    return None


def build_pipeline(knobs: Knobs, model: Decoder, dims: ParallelDims, device: torch.device) -> TrainStep:
    """This rank's stages, the schedule over them, and the train step."""
    rank = dist.get_rank()
    dp_rank, pp_rank, _ = dims.coords(rank)
    pp, m, schedule = dims.pp, knobs.microbatches, knobs.pp_schedule
    v = knobs.virtual_stages if schedule == "interleaved" else 1
    groups = new_grid_groups(dims)
    # dp × tp × pp: Megatron-shard the whole model over the tp group first, so
    # every stage cut from it holds its blocks' shards (same cut on every rank:
    # the shards of one tp group are equal in size).
    sp = knobs.sequence_parallel == "megatron"
    tp = apply_tensor_parallel(model, group=groups.tp, sequence_parallel=sp) if dims.tp > 1 else None
    partition, piece_times = _partition(knobs, model, dims, pp * v, device)
    chunks = build_stages(model, pp_rank, pp, v, partition=partition, seq_split=dims.tp if sp else 1)
    p2p = P2P(groups.pp_ranks)
    pipe = PipelineRank(chunks, p2p, dim=model.cfg.dim, device=device, stash_weights=schedule == "pipedream",
                        loss_fn=tp.loss if tp else lm_loss)
    params = [p for c in chunks for p in c.parameters()]
    names = [n for c in chunks for n in c.model_names]
    optimizer = make_optimizer(knobs.optimizer, zip(names, params), fused=False)
    dp_group = groups.dp
    is_last = any(c.is_last for c in chunks)

    notes: dict = {
        "model_type": "impl.model.Decoder", "optimizer_impl": NOTES[knobs.optimizer],
        "pipeline": (f"impl.pipeline_schedules.train_step_{schedule}, {pp * v} stages balanced by "
                     f"{'measured time' if knobs.pp_balance == 'time' else 'parameters'} "
                     f"(rank {rank}: stages {[c.stage for c in chunks]}, "
                     f"blocks {[list(c.layer_ids) for c in chunks]}), {m} micro-batches"
                     + (f", dp = {dims.dp} replicas (flat gradient all-reduce after the flush)" if dims.dp > 1 else "")
                     + (f", each stage Megatron 1D tensor parallel over tp = {dims.tp} ranks"
                        + (" with sequence parallel" if sp else "") if tp else "")),
        "pipeline_schedule": schedule,
        "pipeline_partition": [list(r) for r in partition],
        "pipeline_balance": knobs.pp_balance,
        "pipeline_grid": {"pp": pp, "dp": dims.dp, "tp": dims.tp, "microbatches": m, "virtual_stages": v,
                          "schedule": schedule},
        "bubble_theory": bubble_fraction(pp, m, schedule, v),
        "bubble_definition": "pipeline idle ÷ busy: Σ_r (T − busy_r) ÷ Σ_r busy_r, T = stage 0's span (first "
                             "forward to last backward), busy = forward/backward compute without receive waits; "
                             f"median over the last {RECENT} steps after the first, mean over replicas. Theory: "
                             "(p−1)/m ((p−1)/(v·m) interleaved), which assumes equal stage times and free "
                             "communication; bubble_stage_theory = the same orders replayed with every op's "
                             "measured duration and free communication (impl/pipeline_bubble.py)",
    }
    if piece_times is not None:
        notes["pipeline_piece_times_s"] = piece_times
    if schedule == "pipedream":
        notes["pipedream"] = (f"asynchronous: one optimizer update per micro-batch per stage ({m} per step), "
                              f"weight stashing; stage r is p−r−1 updates stale")
    history: list[dict] = []
    store = dist.distributed_c10d._get_default_store()
    calls = [0]

    def update() -> None:
        if tp is not None:
            tp.sync_sequence_parallel_grads()  # the norm weights' partial sums under SP (no-op without)
        if dp_group is not None:
            allreduce_mean_grads(params, dp_group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step(batch: Batch) -> torch.Tensor | None:
        if rank == 0:
            _collect(store, dims.world_size, notes)
        s = calls[0]
        calls[0] += 1
        if schedule == "pipedream":
            stats = SCHEDULES[schedule](pipe, batch.inputs, batch.targets, m, s, update)
        else:
            optimizer.zero_grad(set_to_none=True)
            stats = SCHEDULES[schedule](pipe, batch.inputs, batch.targets, m)
            update()
        history.append({"max_in_flight": stats.max_in_flight, "max_weight_versions": stats.max_weight_versions,
                        "busy_s": stats.busy_s, "schedule_s": stats.schedule_s, "span_s": span_s(stats.timeline),
                        "timeline": stats.timeline})
        summary = _summarise(history)
        if rank == 0:
            notes.setdefault("pipeline_by_rank", {})["0"] = summary
            _aggregate(notes, dims.world_size)
        else:
            store.set(f"trainbench/pipeline/{rank}", json.dumps(summary))
        if not is_last or not stats.losses:
            return None
        return torch.stack([l.float() for l in stats.losses]).mean().cpu()

    train_step = TrainStep(step, modules=chunks, optimizers=[optimizer], notes=notes)
    # TrainStep copies ``notes``; the per-step figures must land in the record's dict.
    notes = train_step.notes
    return train_step


def _partition(knobs: Knobs, model: Decoder, dims: ParallelDims, n_stages: int, device: torch.device):
    """Blocks per stage, the same on every rank; with ``pp_balance: time`` also the piece times
    ({"blocks": [...], "embedding": s, "head": s}) rank 0 measured and broadcast."""
    if knobs.pp_balance == "params":  # every rank holds the same full model: the same cut everywhere
        return partition_model(model, n_stages, balance="params"), None
    payload: list = [None]
    if dist.get_rank() == 0:
        rows = knobs.batch_size // (dims.dp * knobs.microbatches)  # one micro-batch, as the stages will see it
        tokens = torch.randint(0, model.cfg.vocab_size, (rows, knobs.seq_len), device=device)
        blocks, embed, head = measure_piece_times(model, tokens, tokens)
        payload = [{"blocks": blocks, "embedding": embed, "head": head}]
    dist.broadcast_object_list(payload, src=0)  # at build time: outside the metered step
    t = payload[0]
    return partition_layers(t["blocks"], n_stages, first_extra=t["embedding"], last_extra=t["head"]), t


def _summarise(history: list[dict]) -> dict:
    steady = history[1:] or history  # the first step pays one-off costs (allocations, gloo pairs)
    ratios = [(h["schedule_s"] - h["busy_s"]) / h["busy_s"] for h in steady if h["busy_s"] > 0]
    idle = [1 - h["busy_s"] / h["schedule_s"] for h in steady if h["schedule_s"] > 0]
    return {
        "steps": len(history),
        "max_in_flight": max(h["max_in_flight"] for h in history),
        "max_weight_versions": max(h["max_weight_versions"] for h in history),
        "idle_over_busy": statistics.median(ratios) if ratios else None,
        "idle_over_total": statistics.median(idle) if idle else None,
        "busy_s": [h["busy_s"] for h in history],
        "schedule_s": [h["schedule_s"] for h in history],
        "span_s": [h["span_s"] for h in history],
        # Each op's seconds, in this rank's order, for the last RECENT steps (the replayed theory).
        "op_s_recent": {str(k): [e[4] - e[3] for e in history[k]["timeline"]]
                        for k in range(max(0, len(history) - RECENT - 1), len(history))},
        # The last two steps' timelines: rank 0 writes the record while the others' latest
        # published figures may be one step older, and the Gantt lanes must show one step.
        "timelines_recent": {str(k): [list(e) for e in history[k]["timeline"]]
                             for k in range(max(0, len(history) - 2), len(history))},
    }


def _collect(store, world: int, notes: dict) -> None:
    """Rank 0 picks up the other ranks' latest figures without waiting for any."""
    by_rank = notes.setdefault("pipeline_by_rank", {})
    for r in range(1, world):
        key = f"trainbench/pipeline/{r}"
        if store.check([key]):
            by_rank[str(r)] = json.loads(store.get(key))
    notes["pipeline_by_rank"] = dict(sorted(by_rank.items(), key=lambda kv: int(kv[0])))
    _aggregate(notes, world)


def _aggregate(notes: dict, world: int) -> None:
    by_rank = notes.get("pipeline_by_rank", {})
    notes["max_in_flight_by_rank"] = {r: s["max_in_flight"] for r, s in sorted(by_rank.items(), key=lambda x: int(x[0]))}
    notes["bubble_ranks_reported"] = len(by_rank)
    if by_rank:  # every lane of the Gantt chart from the same step: the last one all ranks reported
        step = min(s["steps"] for s in by_rank.values()) - 1
        notes["pipeline_timeline_step"] = step
        for s in by_rank.values():
            if "timelines_recent" in s:  # popped once picked: the record keeps one step per rank
                s["timeline_last_step"] = s.pop("timelines_recent").get(str(step), [])
    grid = notes["pipeline_grid"]
    if grid["schedule"] == "pipedream":  # no flush: stage 0 does not bound the step; per-rank figures only
        return
    pp, tp = grid["pp"], grid.get("tp", 1)  # one pipeline per (dp, tp) coordinate (ParallelDims.coords)
    replicas = [_replica_bubble(by_rank, [str((d * pp + i) * tp + k) for i in range(pp)], grid)
                for d in range(grid["dp"]) for k in range(tp)]
    replicas = [r for r in replicas if r is not None]
    for i, key in enumerate(("bubble_measured", "bubble_stage_theory", "pipeline_busy_max_over_mean")):
        notes[key] = statistics.mean(r[i] for r in replicas) if replicas else None
    within = {}
    for key, theory in (("theory", notes.get("bubble_theory")), ("stage_theory", notes["bubble_stage_theory"])):
        if notes["bubble_measured"] is not None and theory:
            ratio = notes["bubble_measured"] / theory
            notes[f"bubble_measured_over_{key}"] = ratio
            within[key] = abs(ratio - 1) <= 0.10
    notes["bubble_within_10pct"] = within


def _replica_bubble(by_rank: dict, ranks: list[str], grid: dict) -> tuple[float, float, float] | None:
    """(measured, theory for the measured stage times, busiest rank's busy ÷ mean busy) of one
    pipeline replica, medians over steps, or None until every rank has reported. Steps pair by
    index (every rank runs every step); the first is excluded (one-off allocations, gloo pairs)."""
    if any(r not in by_rank for r in ranks):
        return None
    n = min(len(by_rank[r]["busy_s"]) for r in ranks)
    pp, v = grid["pp"], grid["virtual_stages"]
    orders = [sync_order(grid["schedule"], grid["microbatches"], pp, i, v) for i in range(pp)]
    measured, theory, imbalance = [], [], []
    for k in range(max(1 if n > 1 else 0, n - RECENT), n):
        busy = [by_rank[r]["busy_s"][k] for r in ranks]
        measured.append(bubble(by_rank[ranks[0]]["span_s"][k], busy))
        imbalance.append(max(busy) / statistics.fmean(busy))
        # The ideal, communication-free run of the same orders at this step's measured op durations.
        theory.append(replay_bubble(orders, [by_rank[r]["op_s_recent"][str(k)] for r in ranks]))
    if not measured:
        return None
    return statistics.median(measured), statistics.median(theory), statistics.median(imbalance)
