"""Pipeline schedules as plain functions (picotron style) over one executor.

A schedule is, per pipeline rank, an *order* of operations ("F", micro, chunk)
and ("B", micro, chunk); ``PipelineRank.run`` executes an order: F receives the
stage input (or takes the tokens on stage 0), runs the chunk and sends its
output on; B receives the output's gradient (or starts from the loss on the
last stage), back-propagates and sends the input's gradient back. Every
schedule below is therefore only its order:

* GPipe (Huang et al. 2019): all m forwards, then all m backwards. A stage holds
  the activations of all m micro-batches at once.
* 1F1B, PipeDream-Flush (Narayanan et al. 2021, §2.1): rank r runs
  w = min(p−r−1, m) warm-up forwards, then alternates one forward and one
  backward, then drains the remaining backwards; it holds at most w+1 ≤ p
  micro-batches. Bubble (p−1)/m of the ideal time, as GPipe's.
* Interleaved 1F1B (Narayanan et al. 2021, §2.2): v chunks per rank; forwards
  run p micro-batches through chunk 0, then the same p through chunk 1, …;
  warm-up (p−r−1)·2 + (v−1)·p units (Megatron-LM's count), needs m % p = 0.
  Bubble (p−1)/(v·m), at v× the point-to-point messages.
* PipeDream asynchronous (Narayanan et al. 2019): 1F1B *without* the flush:
  the warm-up happens once, and every stage updates its weights after each
  micro-batch's backward. Weight stashing: a forward runs on a snapshot of the
  weights current at that moment, and its backward differentiates that same
  snapshot, so each gradient is consistent with its forward — but it is
  applied to newer weights.

PipeDream staleness (what "one step" means here). Micro-batches form one
stream k = 0, 1, 2, …; harness step s feeds k ∈ [s·m, (s+1)·m). Rank r (one
stage, w = p−r−1) runs, in step s: for each k of the step, F(k) then, once
k ≥ w, B(k−w) followed by one optimizer update. So

* one optimizer update per micro-batch per stage (the paper's definition):
  m updates per harness step, each on a micro-batch's mean loss (not ÷m);
* F(k) on stage r sees the weights after the updates of micro-batches
  0 … k−w−1: stage r is w = p−r−1 updates stale (the last stage is plain SGD,
  stage 0 is p−1 updates behind); the update from k lands on weights that
  already include k−w … k−1;
* rank r keeps w+1 = p−r weight versions and w+1 micro-batches of activations;
* the w backwards still pending at the end of step s run during step s+1.

This is not the synchronous reference's trajectory (m updates of b/m rows per
step instead of one of b rows, plus staleness), so PipeDream is checked
against ``simulate_pipedream``: a single-process replay of the same stream,
where micro-batch k's forward on stage r uses weight version max(0, k−w_r).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch.func import functional_call

from impl.model import lm_loss
from impl.pipeline import ACTIVATION, GRADIENT, P2P, PipelineStage

Op = tuple[str, int, int]  # ("F" | "B", micro-batch id, chunk index on this rank)


# --- orders ----------------------------------------------------------------------------------


def gpipe_order(m: int, pp: int, pp_rank: int) -> list[Op]:
    return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]


def one_f_one_b_order(m: int, pp: int, pp_rank: int) -> list[Op]:
    w = min(pp - pp_rank - 1, m)
    ops: list[Op] = [("F", i, 0) for i in range(w)]
    for i in range(m - w):
        ops += [("F", w + i, 0), ("B", i, 0)]
    return ops + [("B", i, 0) for i in range(m - w, m)]


def interleaved_order(m: int, pp: int, pp_rank: int, v: int) -> list[Op]:
    """Megatron-LM's interleaved 1F1B order for v chunks (Narayanan et al. 2021, §2.2)."""
    if m % pp:
        raise ValueError(f"interleaved 1F1B needs microbatches ({m}) divisible by pp ({pp})")
    total = m * v

    def unit(k: int, forward: bool) -> tuple[int, int]:
        group, within = divmod(k, pp * v)
        chunk = within // pp
        return group * pp + within % pp, chunk if forward else v - 1 - chunk

    warm = total if m == pp else min(total, (pp - pp_rank - 1) * 2 + (v - 1) * pp)
    ops: list[Op] = [("F", *unit(k, True)) for k in range(warm)]
    for k in range(total - warm):
        ops += [("F", *unit(warm + k, True)), ("B", *unit(k, False))]
    return ops + [("B", *unit(k, False)) for k in range(total - warm, total)]


def sync_order(schedule: str, m: int, pp: int, pp_rank: int, v: int = 1) -> list[Op]:
    """One flushed step's order of a synchronous schedule (``gpipe``, ``1f1b``, ``interleaved``)."""
    if schedule == "gpipe":
        return gpipe_order(m, pp, pp_rank)
    if schedule == "1f1b":
        return one_f_one_b_order(m, pp, pp_rank)
    if schedule == "interleaved":
        return interleaved_order(m, pp, pp_rank, v)
    raise ValueError(f"no flushed order for schedule {schedule!r}")


def pipedream_order(step: int, m: int, pp: int, pp_rank: int) -> list[Op]:
    """Harness step ``step`` of the un-flushed 1F1B stream (see the module docstring)."""
    w = pp - pp_rank - 1
    ops: list[Op] = []
    for k in range(step * m, (step + 1) * m):
        ops.append(("F", k, 0))
        if k >= w:
            ops.append(("B", k - w, 0))
    return ops


# --- executor --------------------------------------------------------------------------------


@dataclass
class StepStats:
    schedule: str
    losses: list[torch.Tensor] = field(default_factory=list)
    """Last stage only: each micro-batch's mean loss (unscaled), in micro-batch order."""
    max_in_flight: int = 0
    """Most micro-batch × chunk activations this rank held for backward at once."""
    max_weight_versions: int = 1
    busy_s: float = 0.0
    """Forward + backward compute (excludes receive waits: those are the bubble)."""
    schedule_s: float = 0.0
    timeline: list[tuple[str, int, int, float, float]] = field(default_factory=list)
    """(op, micro, chunk, start_s, end_s) from the schedule's start."""

    @property
    def bubble_pct(self) -> float:
        return 100.0 * (1 - self.busy_s / self.schedule_s) if self.schedule_s else 0.0


class PipelineRank:
    """One pipeline rank's chunks and the state a schedule runs on.

    ``micro_shape`` = (b/m, T): the hidden state crossing a stage boundary is
    (b/m, T/seq_split, D) — the stages' ``seq_split`` = t under Megatron sequence
    parallel, where each tensor-parallel rank holds T/t positions. ``loss_scale``
    multiplies each micro-batch's loss before backward (1/m for the synchronous
    schedules: one step = a full-batch step of the mean loss). ``loss_fn`` maps
    the last stage's output and the targets to the mean loss (the
    vocab-parallel cross-entropy under tensor parallelism). ``stash_weights``
    runs forwards on weight snapshots (PipeDream)."""

    def __init__(self, chunks: list[PipelineStage], p2p: P2P, *, dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", stash_weights: bool = False,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss) -> None:
        self.chunks, self.p2p, self.dim, self.dtype = chunks, p2p, dim, dtype
        self.loss_fn = loss_fn
        self.device = torch.device(device)
        self.stash_weights = stash_weights
        self.in_flight: dict[tuple[int, int], tuple] = {}  # persists across steps (PipeDream)
        self.version = [0] * len(chunks)
        self._stash: dict[tuple[int, int], list] = {}  # (chunk, version) -> [params dict, refs]

    # ---- the two operations ----
    def forward(self, micro: int, c: int, tokens: torch.Tensor | None, targets: torch.Tensor | None,
                loss_scale: float, stats: StepStats) -> None:
        chunk = self.chunks[c]
        if chunk.is_first:
            x = tokens
        else:
            b, T = micro_shape(self)
            shape = (b, T // chunk.seq_split, self.dim)
            x = self.p2p.recv(shape, self.dtype, self.device, kind=ACTIVATION, from_stage=chunk.stage - 1,
                              to_stage=chunk.stage, micro=micro).requires_grad_()
        start = time.perf_counter()
        key = None
        if self.stash_weights:
            key = (c, self.version[c])
            if key not in self._stash:
                self._stash[key] = [{n: p.detach().clone().requires_grad_() for n, p in chunk.named_parameters()}, 0]
                stats.max_weight_versions = max(stats.max_weight_versions,
                                                sum(1 for k in self._stash if k[0] == c))
            self._stash[key][1] += 1
            out = functional_call(chunk, self._stash[key][0], (x,))
        else:
            out = chunk(x)
        loss = None
        if chunk.is_last:
            loss = self.loss_fn(out, targets)
            stats.losses.append(loss.detach())
            out = loss * loss_scale
        end = time.perf_counter()
        stats.busy_s += end - start
        stats.timeline.append(("F", micro, c, start - self._t0, end - self._t0))
        if not chunk.is_last:
            self.p2p.send(out, kind=ACTIVATION, to_stage=chunk.stage + 1, micro=micro)
        self.in_flight[(micro, c)] = (x, out, key)
        stats.max_in_flight = max(stats.max_in_flight, len(self.in_flight))

    def backward(self, micro: int, c: int, stats: StepStats) -> None:
        chunk = self.chunks[c]
        x, out, key = self.in_flight.pop((micro, c))
        grad = None
        if not chunk.is_last:
            grad = self.p2p.recv(out.shape, out.dtype, self.device, kind=GRADIENT, from_stage=chunk.stage + 1,
                                 to_stage=chunk.stage, micro=micro)
        start = time.perf_counter()
        torch.autograd.backward(out, grad)
        if key is not None:  # PipeDream: the snapshot's gradients become the live parameters' gradients
            stash = self._stash[key]
            for n, p in chunk.named_parameters():
                g = stash[0][n].grad
                p.grad = g if p.grad is None else p.grad + g
                stash[0][n].grad = None
            stash[1] -= 1
        end = time.perf_counter()
        stats.busy_s += end - start
        stats.timeline.append(("B", micro, c, start - self._t0, end - self._t0))
        if not chunk.is_first:
            self.p2p.send(x.grad, kind=GRADIENT, to_stage=chunk.stage - 1, micro=micro)

    def new_version(self, c: int) -> None:
        """Chunk c's weights changed (PipeDream's per-micro-batch update): drop unused old snapshots."""
        self.version[c] += 1
        for key in [k for k, (_, refs) in self._stash.items() if k[0] == c and refs == 0]:
            del self._stash[key]

    def run(self, schedule: str, ops: list[Op], tokens: dict[int, torch.Tensor], targets: dict[int, torch.Tensor],
            *, loss_scale: float, after_backward: Callable[[int, int], None] | None = None,
            flush: bool = True) -> StepStats:
        """Execute ``ops``; ``tokens``/``targets`` map micro-batch id → (b/m, T) (stage 0 / last stage).
        ``flush=False`` leaves gradient sends whose receiver runs in the next step outstanding (PipeDream)."""
        self._micro_shape = next(iter(tokens.values())).shape
        stats = StepStats(schedule)
        self._t0 = time.perf_counter()
        for op, micro, c in ops:
            if op == "F":
                self.forward(micro, c, tokens.get(micro), targets.get(micro), loss_scale, stats)
            else:
                self.backward(micro, c, stats)
                if after_backward is not None:
                    after_backward(micro, c)
        # PipeDream: every activation is consumed within the step, some gradients only in the next.
        self.p2p.wait_sends() if flush else self.p2p.wait_sends((ACTIVATION,))
        stats.schedule_s = time.perf_counter() - self._t0
        return stats


def micro_shape(rank: PipelineRank) -> tuple[int, int]:
    return tuple(rank._micro_shape)  # type: ignore[return-value]


def _micro_dicts(inputs: torch.Tensor, targets: torch.Tensor, m: int, first_id: int = 0):
    """(b, T) → m micro-batches of (b/m, T), keyed by stream id."""
    if inputs.shape[0] % m:
        raise ValueError(f"a local batch of {inputs.shape[0]} rows does not split into {m} micro-batches")
    return ({first_id + i: t for i, t in enumerate(inputs.chunk(m))},
            {first_id + i: t for i, t in enumerate(targets.chunk(m))})


# --- the schedules ---------------------------------------------------------------------------
# Each runs forward + backward of one step on this rank; the caller owns zero_grad,
# the data-parallel gradient all-reduce and the optimizer step (synchronous ones).


def train_step_gpipe(rank: PipelineRank, inputs: torch.Tensor, targets: torch.Tensor, m: int) -> StepStats:
    tokens, tgts = _micro_dicts(inputs, targets, m)
    return rank.run("gpipe", gpipe_order(m, rank.p2p.pp, _pp_rank(rank)), tokens, tgts, loss_scale=1 / m)


def train_step_1f1b(rank: PipelineRank, inputs: torch.Tensor, targets: torch.Tensor, m: int) -> StepStats:
    tokens, tgts = _micro_dicts(inputs, targets, m)
    return rank.run("1f1b", one_f_one_b_order(m, rank.p2p.pp, _pp_rank(rank)), tokens, tgts, loss_scale=1 / m)


def train_step_interleaved(rank: PipelineRank, inputs: torch.Tensor, targets: torch.Tensor, m: int) -> StepStats:
    tokens, tgts = _micro_dicts(inputs, targets, m)
    order = interleaved_order(m, rank.p2p.pp, _pp_rank(rank), len(rank.chunks))
    return rank.run("interleaved", order, tokens, tgts, loss_scale=1 / m)


def train_step_pipedream(rank: PipelineRank, inputs: torch.Tensor, targets: torch.Tensor, m: int, step: int,
                         update: Callable[[], None]) -> StepStats:
    """Harness step ``step`` of asynchronous PipeDream; ``update()`` applies the gradients
    now in the live parameters (all-reduce across replicas, optimizer step, zero_grad)
    and is called after every backward."""
    if len(rank.chunks) != 1:
        raise ValueError("PipeDream runs one chunk per rank")
    tokens, tgts = _micro_dicts(inputs, targets, m, first_id=step * m)

    def after_backward(micro: int, c: int) -> None:
        update()
        rank.new_version(c)

    order = pipedream_order(step, m, rank.p2p.pp, _pp_rank(rank))
    return rank.run("pipedream", order, tokens, tgts, loss_scale=1.0, after_backward=after_backward,
                    flush=False)


SCHEDULES = {"gpipe": train_step_gpipe, "1f1b": train_step_1f1b, "interleaved": train_step_interleaved,
             "pipedream": train_step_pipedream}


def _pp_rank(rank: PipelineRank) -> int:
    return rank.chunks[0].stage % rank.p2p.pp


def allreduce_mean_grads(params: list[torch.nn.Parameter], group) -> None:
    """Average gradients over a data-parallel group in one flat all-reduce
    (every replica ran the same micro-batch count, so the mean of means is the global mean)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# --- PipeDream reference ---------------------------------------------------------------------


def simulate_pipedream(stages: list[PipelineStage], optimizer_for: Callable[[list], torch.optim.Optimizer],
                       batches: list[tuple[torch.Tensor, torch.Tensor]], m: int) -> tuple[list[list[dict]], list[float]]:
    """Single-process replay of the PipeDream stream over ``stages`` (all p stages, one
    chunk each, in order). Micro-batch k's forward on stage r uses weight version
    max(0, k − w_r), w_r = p−r−1; its backward's gradient then updates the stage's
    live weights (version k → k+1). Returns every stage's weight history
    (history[r][j] = weights after j updates) and the per-step mean loss."""
    p = len(stages)
    live = [dict(s.named_parameters()) for s in stages]
    opts = [optimizer_for(list(lv.values())) for lv in live]
    history = [[{n: t.detach().clone() for n, t in lv.items()}] for lv in live]
    step_losses = []
    for inputs, targets in batches:
        losses = []
        for x_mb, y_mb in zip(inputs.chunk(m), targets.chunk(m)):
            k = len(history[-1]) - 1  # updates so far = this micro-batch's stream id
            snaps = [{n: t.clone().requires_grad_() for n, t in history[r][max(0, k - (p - r - 1))].items()}
                     for r in range(p)]
            h = x_mb
            for r, stage in enumerate(stages):
                h = functional_call(stage, snaps[r], (h,))
            loss = lm_loss(h, y_mb)
            loss.backward()
            losses.append(loss.item())
            for r in range(p):
                for n, t in live[r].items():
                    t.grad = snaps[r][n].grad
                opts[r].step()
                opts[r].zero_grad(set_to_none=True)
                history[r].append({n: t.detach().clone() for n, t in live[r].items()})
        step_losses.append(sum(losses) / len(losses))
    return history, step_losses
