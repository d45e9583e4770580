"""Pipeline parallelism, the pieces: partitioning, stage modules, point-to-point.

The decoder's blocks are cut into S = p·v contiguous *stages* (v model chunks
per rank; v = 1 except for interleaved 1F1B). Stage 0 also owns
``tok_embeddings``; stage S−1 owns ``norm`` + ``output`` and the loss. Stage s
lives on pipeline rank s mod p, chunk s // p — the loop placement of
Narayanan et al. 2021, §2.2, so chunk c of rank p−1 feeds chunk c+1 of rank 0.

Between neighbouring stages only one tensor crosses, in each direction, per
micro-batch: the (b/m, T, D) hidden state forward and its gradient backward.
Shapes are known in advance, so receivers pre-allocate and no shape message
is exchanged. Sends are non-blocking and receives blocking: a rank only ever
waits for data it needs next, so any schedule whose per-rank order is
causally consistent (every schedule in ``impl.pipeline_schedules``) cannot
deadlock, whatever order gloo matches messages in — each message carries a
tag naming its kind, destination stage and micro-batch.

The schedules themselves are in ``impl/pipeline_schedules.py``.
"""
from __future__ import annotations

import time
import torch
import torch.distributed as dist
from torch import nn

from impl.model import Decoder, lm_loss


# --- partitioning --------------------------------------------------------------------------


def piece_param_counts(model: Decoder) -> tuple[list[int], int, int]:
    """Parameters per block, of the embedding (stage 0's extra) and of norm + output (the last stage's)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return ([count(b) for b in model.layers], count(model.tok_embeddings),
            count(model.norm) + count(model.output))


def measure_piece_times(model: Decoder, tokens: torch.Tensor, targets: torch.Tensor,
                        repeats: int = 3) -> tuple[list[float], float, float]:
    """Forward + backward seconds per block, of the embedding, and of norm + output + loss,
    on one micro-batch (best of ``repeats``). Ranks time on their own clocks, so a
    caller that partitions by time must agree on one measurement (broadcast it)."""
    T = tokens.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]

    def timed(fn, x):
        best = float("inf")
        for _ in range(repeats):
            xi = x.detach().requires_grad_(x.is_floating_point())
            start = time.perf_counter()
            out = fn(xi)
            out.float().sum().backward() if out.dim() else out.backward()
            best = min(best, time.perf_counter() - start)
        return best

    h = model.tok_embeddings(tokens).detach()
    blocks = [timed(lambda x, b=b: b(x, cos, sin), h) for b in model.layers]
    embed = timed(model.tok_embeddings, tokens)
    head = timed(lambda x: lm_loss(model.output(model.norm(x)), targets), h)
    model.zero_grad(set_to_none=True)
    return blocks, embed, head


def partition_layers(block_costs: list[float], n_stages: int, *, first_extra: float = 0.0,
                     last_extra: float = 0.0) -> list[range]:
    """Contiguous blocks per stage minimising the most expensive stage, every stage
    holding at least one block. The first stage's cost includes ``first_extra``
    (the embedding), the last's ``last_extra`` (norm + head + loss).

    Exact min–max by dynamic programming over (stages, blocks): O(S·L²), trivial for
    L ≤ a few hundred; ties go to the split that puts blocks on earlier stages."""
    L = len(block_costs)
    if not 1 <= n_stages <= L:
        raise ValueError(f"cannot cut {L} blocks into {n_stages} non-empty stages")
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> float:  # stage s holds blocks i..j-1
        return prefix[j] - prefix[i] + (first_extra if s == 0 else 0.0) + (last_extra if s == n_stages - 1 else 0.0)

    inf = float("inf")
    # best[s][j]: smallest max-stage-cost of placing blocks 0..j-1 on stages 0..s
    best = [[inf] * (L + 1) for _ in range(n_stages)]
    cut = [[0] * (L + 1) for _ in range(n_stages)]
    for j in range(1, L + 1):
        best[0][j] = cost(0, 0, j)
    for s in range(1, n_stages):
        for j in range(s + 1, L + 1):
            for i in range(j - 1, s - 1, -1):  # larger i first: ties keep blocks early
                v = max(best[s - 1][i], cost(s, i, j))
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    bounds, j = [L], L
    for s in range(n_stages - 1, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


def partition_model(model: Decoder, n_stages: int, *, balance: str = "params",
                    sample: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[range]:
    """Blocks per stage, balanced by parameter count (``"params"``) or by measured
    forward+backward time on ``sample`` = (tokens, targets) of one micro-batch (``"time"``)."""
    if balance == "params":
        blocks, embed, head = piece_param_counts(model)
    elif balance == "time":
        if sample is None:
            raise ValueError("balance = 'time' needs a sample micro-batch to time")
        blocks, embed, head = measure_piece_times(model, *sample)
    else:
        raise ValueError(f"balance must be 'params' or 'time', not {balance!r}")
    return partition_layers(blocks, n_stages, first_extra=embed, last_extra=head)


def stages_of_rank(pp_rank: int, pp: int, virtual_stages: int = 1) -> list[int]:
    """Global stage ids held by a pipeline rank, chunk order: loop placement r, r+p, r+2p, …"""
    return [pp_rank + c * pp for c in range(virtual_stages)]


# --- stage module ----------------------------------------------------------------------------


class PipelineStage(nn.Module):
    """One stage's share of the decoder, sharing the model's parameters (no copy).

    Stage 0: (b, T) token ids → (b, T, D) hidden; middle: (b, T, D) → (b, T, D);
    last: → (b, T, V) logits (``loss`` turns them into the mean cross-entropy)."""

    def __init__(self, model: Decoder, layer_ids: range, *, stage: int, n_stages: int, seq_split: int = 1) -> None:
        super().__init__()
        self.stage, self.n_stages, self.layer_ids = stage, n_stages, layer_ids
        # Under Megatron sequence parallel the hidden state holds T/seq_split positions per
        # rank; RoPE still rotates all T (attention gathers the sequence first).
        self.seq_split = seq_split
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.tok_embeddings = model.tok_embeddings if self.is_first else None
        self.layers = nn.ModuleList(model.layers[i] for i in layer_ids)
        self.norm = model.norm if self.is_last else None
        self.output = model.output if self.is_last else None
        # RoPE tables by reference (plain attributes, not buffers: every stage rotates 0..T-1).
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin
        # Full model names of this stage's parameters (LAMB/LARS groups, reports).
        ids = {id(p): n for n, p in model.named_parameters()}
        self.model_names = [ids[id(p)] for p in self.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.is_first else x
        T = h.shape[1] * self.seq_split
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h)) if self.is_last else h


def build_stages(model: Decoder, pp_rank: int, pp: int, virtual_stages: int = 1, *,
                 partition: list[range] | None = None, seq_split: int = 1) -> list[PipelineStage]:
    """This rank's chunks (loop placement), cut by ``partition`` (default: balanced by params)."""
    n_stages = pp * virtual_stages
    partition = partition or partition_model(model, n_stages)
    return [PipelineStage(model, partition[s], stage=s, n_stages=n_stages, seq_split=seq_split)
            for s in stages_of_rank(pp_rank, pp, virtual_stages)]


# --- point-to-point --------------------------------------------------------------------------

ACTIVATION, GRADIENT = 0, 1
_STAGE_SLOTS, _MB_SLOTS, _EPOCHS = 1 << 10, 1 << 15, 1 << 4  # tag = ((epoch·2 + kind)·stages + stage)·mbs + mb < 2^30


class P2P:
    """Point-to-point between stages. ``ranks[i]`` is the global rank of pipeline rank i
    (this data-parallel replica's pipeline group); stage s is on ``ranks[s % pp]``.

    Each instance tags its messages with its own epoch (instances are created in
    the same order on every rank), so a send still outstanding from an earlier
    pipeline — PipeDream's stream ends with unmatched gradients — can never be
    matched by a later one."""

    _created = 0

    def __init__(self, ranks: list[int]) -> None:
        self.ranks, self.pp = list(ranks), len(ranks)
        self.epoch = P2P._created % _EPOCHS
        P2P._created += 1
        self._sends: list[tuple[int, dist.Work, torch.Tensor]] = []

    def tag(self, kind: int, stage: int, micro: int) -> int:
        """Unique per (epoch, kind, destination stage, micro-batch): gloo matches on (peer, tag)."""
        return ((self.epoch * 2 + kind) * _STAGE_SLOTS + stage) * _MB_SLOTS + micro % _MB_SLOTS

    def send(self, tensor: torch.Tensor, *, kind: int, to_stage: int, micro: int) -> None:
        """Non-blocking. The tensor and the work handle are kept until ``wait_sends``:
        a gloo send dropped before its receiver posts the recv is lost."""
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, dst=self.ranks[to_stage % self.pp], tag=self.tag(kind, to_stage, micro))
        self._sends.append((kind, work, tensor))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, kind: int,
             from_stage: int, to_stage: int, micro: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.irecv(buf, src=self.ranks[from_stage % self.pp], tag=self.tag(kind, to_stage, micro)).wait()
        return buf

    def wait_sends(self, kinds: tuple[int, ...] = (ACTIVATION, GRADIENT)) -> None:
        """Wait for the outstanding sends of ``kinds``; keep the others."""
        keep = []
        for kind, work, tensor in self._sends:
            if kind in kinds:
                work.wait()
            else:
                keep.append((kind, work, tensor))
        self._sends = keep
