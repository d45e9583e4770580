"""Under torchrun: the in-house pipeline schedules against single-process references.

* GPipe, 1F1B and interleaved 1F1B (pp = world size, or dp = 2 × pp = 2 at 4 ranks):
  after STEPS AdamW steps every stage's parameters equal single-process
  full-batch training within 1e-5 relative (per tensor, ‖p − q‖/‖q‖, fp32), and
  the last stage's losses equal the reference's.
* Activations held at once per rank: GPipe m; 1F1B min(p − r, m) ≤ p;
  interleaved min(m·v, 2(p−r−1) + (v−1)p + 1); PipeDream p − r.
* PipeDream (asynchronous, weight stashing) equals ``simulate_pipedream`` —
  the same stale-weight stream replayed in one process — and keeps p − r
  weight versions on rank r.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist._exit import finish

from bench.adapters.inhouse.optimizers import make_optimizer
from bench.workloads.train import global_batch, local_batch
from impl.model import build_model, lm_loss, model_config
from impl.parallel_dims import ParallelDims
from impl.pipeline import P2P, PipelineStage, build_stages, partition_model
from impl.pipeline_schedules import SCHEDULES, PipelineRank, allreduce_mean_grads, simulate_pipedream

STEPS, SEQ, SEED = 3, 16, 5
CFG = model_config("tiny")


def batch(step: int, batch_size: int):
    return global_batch(CFG, batch_size=batch_size, seq_len=SEQ, seed=2, step=step)


def reference(batch_size: int):
    model = build_model(CFG, seed=SEED)
    opt = make_optimizer("adamw", model.named_parameters())
    losses = []
    for step in range(STEPS):
        b = batch(step, batch_size)
        loss = lm_loss(model(b.inputs), b.targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return dict(model.named_parameters()), losses


def run(schedule: str, dims: ParallelDims, m: int, v: int, batch_size: int):
    rank = dist.get_rank()
    dp_rank, pp_rank, _ = dims.coords(rank)
    model = build_model(CFG, seed=SEED)
    chunks = build_stages(model, pp_rank, dims.pp, v)
    pipe = PipelineRank(chunks, P2P([dp_rank * dims.pp + i for i in range(dims.pp)]), dim=CFG.dim,
                        stash_weights=schedule == "pipedream")
    params = [p for c in chunks for p in c.parameters()]
    opt = make_optimizer("adamw", zip([n for c in chunks for n in c.model_names], params))
    groups = [dist.new_group([d * dims.pp + r for d in range(dims.dp)]) for r in range(dims.pp)] if dims.dp > 1 else None

    def update():
        if groups:
            allreduce_mean_grads(params, groups[pp_rank])
        opt.step()
        opt.zero_grad(set_to_none=True)

    all_stats = []
    for step in range(STEPS):
        b = local_batch(batch(step, batch_size), dp_rank=dp_rank, dp=dims.dp)
        if schedule == "pipedream":
            stats = SCHEDULES[schedule](pipe, b.inputs, b.targets, m, step, update)
        else:
            stats = SCHEDULES[schedule](pipe, b.inputs, b.targets, m)
            update()
        all_stats.append(stats)
    # PipeDream leaves gradient sends outstanding across steps (flush=False), kept
    # alive by `pipe`; a gloo send dropped before its receiver posts the recv is
    # lost, so `pipe` must outlive every rank's last recv: a slower stage would
    # otherwise wait forever for a gradient a faster one had sent (seen: pp rank 1
    # in P2P.recv, the others past the schedule, ~1 run in 4 on a loaded machine).
    dist.barrier()
    return model, chunks, all_stats


def rel_err(p: torch.Tensor, q: torch.Tensor) -> float:
    return ((p - q).norm() / q.norm()).item()


def check_sync(schedule: str, dims: ParallelDims, m: int, v: int, want: dict, want_losses: list) -> None:
    rank = dist.get_rank()
    _, pp_rank, _ = dims.coords(rank)
    model, chunks, stats = run(schedule, dims, m, v, batch_size=8)
    worst = 0.0
    for c in chunks:
        for n in c.model_names:
            err = rel_err(dict(model.named_parameters())[n], want[n].detach())
            assert err < 1e-5, (schedule, dims, m, n, err)
            worst = max(worst, err)
    p = dims.pp
    held = max(s.max_in_flight for s in stats)
    expect = {"gpipe": m, "1f1b": min(p - pp_rank, m),
              "interleaved": min(m * v, 2 * (p - pp_rank - 1) + (v - 1) * p + 1)}[schedule]
    assert held == expect, (schedule, dims, m, pp_rank, held, expect)
    if schedule == "1f1b":
        assert held <= p
    if any(c.is_last for c in chunks):
        for s, ref in zip(stats, want_losses):
            loss = torch.stack(s.losses).mean().item()
            if dims.dp == 1:
                assert abs(loss - ref) <= 1e-5 * ref, (schedule, loss, ref)
    report = torch.tensor([worst, float(held)])
    gathered = [torch.zeros(2) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, report)
    if rank == 0:
        print(f"OK {schedule} pp={p} dp={dims.dp} m={m} v={v} max_rel_err={max(g[0].item() for g in gathered):.2e} "
              f"held_by_rank={[int(g[1]) for g in gathered]}")


def check_pipedream(dims: ParallelDims, m: int) -> None:
    assert dims.dp == 1
    rank = dist.get_rank()
    _, pp_rank, _ = dims.coords(rank)
    model, chunks, stats = run("pipedream", dims, m, 1, batch_size=8)
    # The simulation: the same p stages in one process, the same stream of micro-batches.
    sim_model = build_model(CFG, seed=SEED)
    parts = partition_model(sim_model, dims.pp)
    stages = [PipelineStage(sim_model, parts[s], stage=s, n_stages=dims.pp) for s in range(dims.pp)]
    history, sim_losses = simulate_pipedream(
        stages, lambda ps: make_optimizer("adamw", ((str(i), p) for i, p in enumerate(ps))),
        [(b.inputs, b.targets) for b in (batch(s, 8) for s in range(STEPS))], m)
    w = dims.pp - pp_rank - 1
    done = STEPS * m - w  # backwards (= updates) this rank has run
    want = history[pp_rank][done]
    worst = 0.0
    live = dict(chunks[0].named_parameters())
    for n, q in want.items():
        err = rel_err(live[n].detach(), q)
        assert err < 1e-5, ("pipedream", dims, m, n, err)
        worst = max(worst, err)
    held = max(s.max_in_flight for s in stats)
    versions = max(s.max_weight_versions for s in stats)
    assert held == dims.pp - pp_rank and versions == dims.pp - pp_rank, (pp_rank, held, versions)
    if chunks[0].is_last:
        for s, ref in zip(stats, sim_losses):
            loss = torch.stack(s.losses).mean().item()
            assert abs(loss - ref) <= 1e-5 * ref, ("pipedream", loss, ref)
    gathered = [torch.zeros(2) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([worst, float(held)]))
    if rank == 0:
        print(f"OK pipedream pp={dims.pp} m={m} max_rel_err={max(g[0].item() for g in gathered):.2e} "
              f"held_by_rank={[int(g[1]) for g in gathered]} sim_losses={[round(x, 4) for x in sim_losses]}")


def main() -> None:
    dist.init_process_group("gloo")
    n = dist.get_world_size()
    want, want_losses = reference(batch_size=8)
    pipes = [ParallelDims(world_size=n, pp=n)]
    if n == 4:
        pipes.append(ParallelDims(world_size=4, dp=2, pp=2))
    for dims in pipes:
        for m in (4, 8) if dims.dp == 1 else (4,):  # 8 rows: 4 per replica at dp = 2
            for schedule in ("gpipe", "1f1b"):
                check_sync(schedule, dims, m, 1, want, want_losses)
            if dims.pp * 2 <= CFG.n_layers and m % dims.pp == 0:
                check_sync("interleaved", dims, m, 2, want, want_losses)
        if dims.dp == 1:
            check_pipedream(dims, 4)
    finish()


if __name__ == "__main__":
    main()
