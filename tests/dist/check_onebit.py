"""Under torchrun: 1-bit Adam / 1-bit LAMB and their compressed all-reduce against
single-process references.

(a) compressed_allreduce equals a simulation of all ranks in one process (signs as
    ±1 floats, no bit packing): result, worker and server errors bit-for-bit, 3 calls.
(b) Warm-up: OneBitAdam equals torch.optim.AdamW, OneBitLamb a single-process LAMB,
    both trained on the global batch: per-tensor ‖p − q‖/‖q‖ < 1e-5.
(c) After warm-up: parameters equal a single-process simulation of the papers'
    algorithm fed both ranks' local gradients (max |Δp| < 1e-6), and the loss after
    STEPS steps stays within LOSS_TOL (relative) of uncompressed fp32 Adam / LAMB.
(d) Bus bytes of one warm-up and one compressed step equal the theory; their ratio ≈ 1/32.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from tests.dist._exit import finish

from bench.meters.comm import CommMeter
from bench.workloads.train import BETAS, EPS, LR, WEIGHT_DECAY, global_batch, local_batch
from impl.compressed_allreduce import compressed_allreduce
from impl.model import build_model, lm_loss, model_config
from impl.optim.onebit import OneBitAdam, OneBitLamb, onebit_bus_bytes_per_step

STEPS, FREEZE, BATCH, SEQ = 30, 10, 16, 16
LOSS_TOL = 0.02  # last-5-step mean loss vs fp32; measured 0.5 % (Adam), 0.2 % (LAMB)
LAMB = dict(max_coeff=10.0, min_coeff=0.01, coeff_beta=0.9, factor_max=4.0, factor_min=0.5, factor_threshold=0.1)


# ---- (a) the compressed all-reduce, all ranks simulated in one process ----------------------------

def sim_compress(y):
    s = (torch.linalg.vector_norm(y) / math.sqrt(y.numel())).reshape(1)
    signs = torch.where(y >= 0, 1.0, -1.0)
    return signs, s, y - signs * s


def sim_allreduce(xs, worker_errors, server_errors):
    """Tang et al. Alg. 1 for n ranks; xs[r] is rank r's buffer. Updates the error lists."""
    n, c = len(xs), xs[0].numel() // len(xs)
    sent = []
    for r, x in enumerate(xs):
        signs, s, worker_errors[r] = sim_compress(x + worker_errors[r])
        sent.append((signs, s))
    out = []
    for j in range(n):
        z = torch.stack([b[j * c:(j + 1) * c] * s.mul(1 / n) for b, s in sent]).sum(0) + server_errors[j]
        signs, t, server_errors[j] = sim_compress(z)
        out.append(signs * t)
    return torch.cat(out)


def check_allreduce(rank, n):
    N = 8 * n * 37
    we, se = torch.zeros(N), torch.zeros(N // n)
    sim_we, sim_se = [torch.zeros(N) for _ in range(n)], [torch.zeros(N // n) for _ in range(n)]
    for call in range(3):
        xs = [torch.randn(N, generator=torch.Generator().manual_seed(100 * call + r)) for r in range(n)]
        for x in xs:
            x[::13] = 0.0  # sign(0) must be +1 on both sides
        got = compressed_allreduce(xs[rank].clone(), we, se)
        want = sim_allreduce(xs, sim_we, sim_se)
        assert torch.equal(got, want), (call, (got - want).abs().max())
        assert torch.equal(we, sim_we[rank]) and torch.equal(se, sim_se[rank]), call
        mean = torch.stack(xs).mean(0)
        rel = rel if call else ((got - mean).norm() / mean.norm()).item()
    return rel


# ---- single-process references for the optimizers --------------------------------------------------

class SimOneBit:
    """The papers' algorithm for n simulated ranks sharing one model, on flat (N,) vectors.
    Warm-up uses the mean gradient; afterwards each rank's momentum is built from its local
    gradient and averaged by sim_allreduce. freeze_step > STEPS gives plain fp32 Adam / LAMB."""

    def __init__(self, params, kind, freeze_step, n, bias_correction):
        self.params, self.kind, self.T, self.n, self.bc = list(params), kind, freeze_step, n, bias_correction
        self.sizes = [p.numel() for p in self.params]
        N = sum(self.sizes)
        pad = math.ceil(N / (8 * n)) * 8 * n
        self.N, self.t = N, 0
        self.m, self.v = torch.zeros(pad), torch.zeros(N)
        self.we, self.se = [torch.zeros(pad) for _ in range(n)], [torch.zeros(pad // n) for _ in range(n)]
        self.cf, self.last, self.sc = [0.0] * len(self.sizes), [1.0] * len(self.sizes), None

    def bias(self, beta, t):
        return 1 - beta ** t if self.bc else 1.0

    def segments(self):
        o = 0
        for i, k in enumerate(self.sizes):
            yield i, slice(o, o + k)
            o += k

    @torch.no_grad()
    def step(self, grads):
        """grads[r]: rank r's local gradient, flat (N,)."""
        b1, b2 = BETAS
        self.t += 1
        p = torch.cat([q.reshape(-1) for q in self.params])
        if self.t <= self.T:
            g = torch.stack(grads).sum(0).div(self.n)
            self.m[:self.N].mul_(b1).add_(g, alpha=1 - b1)
            self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if self.t == self.T:
                self.v_fresh = self.v.clone()
        else:
            if self.kind == "lamb" and self.sc is None:
                sig = [(self.m[s].norm() / math.sqrt(s.stop - s.start)).item() for _, s in self.segments()]
                self.sc = [sum(sig) / len(sig) / x for x in sig]
            m_last = self.m.clone()
            local = []
            for g in grads:
                m = m_last.clone()
                m[self.N:] = 0.0  # padding carries no momentum
                m[:self.N].mul_(b1).add_(g, alpha=1 - b1)
                if self.kind == "lamb":
                    for i, s in self.segments():
                        m[s].mul_(self.sc[i])
                local.append(m)
            self.m = sim_allreduce(local, self.we, self.se)
            if self.kind == "lamb":
                for i, s in self.segments():
                    self.m[s].div_(self.sc[i])
        t_v = min(self.t, self.T)
        m, v = self.m[:self.N], self.v
        if self.kind == "adam":
            p.mul_(1 - LR * WEIGHT_DECAY)
            p.addcdiv_(m, (v.sqrt() / math.sqrt(self.bias(b2, t_v))).add_(EPS), value=-LR / self.bias(b1, self.t))
        else:
            for i, s in self.segments():
                denom = (v[s] / self.bias(b2, t_v)).sqrt() + EPS
                pre = (m[s] / self.bias(b1, self.t)) / denom
                upd = pre + WEIGHT_DECAY * p[s]
                if self.t <= self.T:
                    c = min(max((p[s].norm() / upd.norm()).item(), LAMB["min_coeff"]), LAMB["max_coeff"])
                    self.cf[i] = LAMB["coeff_beta"] * self.cf[i] + (1 - LAMB["coeff_beta"]) * c
                else:  # Li et al. §3: frozen coefficient × fresh-variance factor
                    g_hat = (m[s] - b1 * m_last[s]) / (1 - b1)
                    self.v_fresh[s].mul_(b2).addcmul_(g_hat, g_hat, value=1 - b2)
                    f = (denom / ((self.v_fresh[s] / self.bias(b2, self.t)).sqrt() + EPS)).max().item()
                    ratio = min(1.0, (pre.norm() / upd.norm()).item())
                    f = min(max(f * ratio + (1 - ratio), LAMB["factor_min"]), LAMB["factor_max"])
                    f = min(max(f, self.last[i] * (1 - LAMB["factor_threshold"])), self.last[i] * (1 + LAMB["factor_threshold"]))
                    self.last[i] = f
                    c = self.cf[i] * f
                p[s].add_(upd, alpha=-LR * c)
        for q, (_, s) in zip(self.params, self.segments()):
            q.copy_(p[s].view_as(q))


def batch(cfg, step, rank, n, size=BATCH):
    return local_batch(global_batch(cfg, batch_size=size, seq_len=SEQ, seed=3, step=step), dp_rank=rank, dp=n)


def grads_of(model, b):
    model.zero_grad()
    loss = lm_loss(model(b.inputs), b.targets)
    loss.backward()
    return loss.item(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def make(kind, model, freeze_step, bias_correction=True):
    cls = OneBitAdam if kind == "adam" else OneBitLamb
    return cls(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
               freeze_step=freeze_step, group=None, bias_correction=bias_correction)


def rel_errors(model, want):
    return {name: ((p - q).norm() / q.norm()).item() for (name, p), q in zip(model.named_parameters(), want)}


# ---- (b) warm-up equals the uncompressed optimizer on the global batch -----------------------------

def check_warmup(kind, cfg, rank, n):
    ref = build_model(cfg, seed=5)
    if kind == "adam":
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    else:
        ref_opt = SimOneBit(ref.parameters(), "lamb", freeze_step=10 ** 9, n=1, bias_correction=True)
    model = build_model(cfg, seed=5)
    opt = make(kind, model, freeze_step=10 ** 9)
    for step in range(8):
        # A small batch: the reference's global-batch mean and the ranks' mean of means differ in
        # rounding, which Adam's normalisation amplifies on rarely-seen embedding rows.
        _, g = grads_of(ref, batch(cfg, step, 0, 1, size=2 * n))
        if kind == "adam":
            ref_opt.step()
        else:
            ref_opt.step([g])
        grads_of(model, batch(cfg, step, rank, n, size=2 * n))
        opt.step()
    errs = rel_errors(model, [p.detach() for p in ref.parameters()])
    worst = max(errs.values())
    assert worst < 1e-5, (kind, max(errs.items(), key=lambda kv: kv[1]))
    return worst


# ---- (c) + (d) after warm-up: the 2-rank run is the simulated algorithm ---------------------------

def check_compressed(kind, bias_correction, cfg, rank, n, *, baseline):
    """baseline: also train uncompressed fp32 Adam / LAMB and compare the loss."""
    model, sim_model, fp32_model = (build_model(cfg, seed=5) for _ in range(3))
    opt = make(kind, model, FREEZE, bias_correction)
    sim = SimOneBit(sim_model.parameters(), kind, FREEZE, n, bias_correction)
    fp32 = SimOneBit(fp32_model.parameters(), kind, STEPS + 1, n, bias_correction)
    losses, fp32_losses, meters = [], [], {}
    for step in range(STEPS):
        loss, _ = grads_of(model, batch(cfg, step, rank, n))
        if opt.steps in (0, FREEZE):  # step 1 (warm-up) and step T+1 (compressed)
            with CommMeter() as meter:
                opt.step()
            meters["compressed" if opt.steps > FREEZE else "warmup"] = meter
        else:
            opt.step()
        total = torch.tensor(loss)
        dist.all_reduce(total)
        losses.append(total.item() / n)
        sim.step([grads_of(sim_model, batch(cfg, step, r, n))[1] for r in range(n)])
        if baseline:
            per_rank = [grads_of(fp32_model, batch(cfg, step, r, n)) for r in range(n)]
            fp32_losses.append(sum(loss for loss, _ in per_rank) / n)
            fp32.step([g for _, g in per_rank])
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), sim_model.parameters()))
    assert diff < 1e-6, (kind, bias_correction, diff)
    note = f"loss {losses[-1]:.4f}"
    if baseline:
        drift = abs(sum(losses[-5:]) - sum(fp32_losses[-5:])) / sum(fp32_losses[-5:])
        assert drift < LOSS_TOL, (kind, bias_correction, losses, fp32_losses)
        progress = (losses[0] - sum(losses[-5:]) / 5) / (fp32_losses[0] - sum(fp32_losses[-5:]) / 5)
        assert progress > 0.5, (kind, progress, losses, fp32_losses)  # learns at least half as fast as fp32
        note += f" vs fp32 {fp32_losses[-1]:.4f} (last-5 mean drift {drift:.2%}, progress {progress:.2f}× fp32's)"

    warm, comp = meters["warmup"].summary(), meters["compressed"].summary()
    assert set(warm) == {"all_reduce"} and warm["all_reduce"]["calls"] == 1, warm
    assert set(comp) == {"all_to_all", "all_gather"}, comp
    assert all(s["calls"] == 1 for s in comp.values()), comp
    numel = opt.numel
    for name, compressed in (("warmup", False), ("compressed", True)):
        want = onebit_bus_bytes_per_step(numel, n, compressed=compressed)
        assert abs(meters[name].bus_bytes - want) < 1e-6, (name, meters[name].bus_bytes, want)
    ratio = meters["compressed"].bus_bytes / meters["warmup"].bus_bytes
    assert abs(ratio * 32 - 1) < 0.01, ratio
    return diff, ratio, note, meters


def main() -> None:
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    cfg = model_config("tiny")
    rel = check_allreduce(rank, n)
    if rank == 0:
        print(f"OK allreduce exact; first call ‖result − mean‖/‖mean‖={rel:.3f}")
    for kind in ("adam", "lamb"):
        worst = check_warmup(kind, cfg, rank, n)
        if rank == 0:
            print(f"OK warmup {kind} max per-tensor rel err={worst:.2e}")
        for bc in (True, False):
            diff, ratio, note, meters = check_compressed(kind, bc, cfg, rank, n, baseline=bc)
            if rank == 0:
                print(f"OK compressed {kind} bias_correction={bc} max|Δp| vs sim={diff:.1e} {note}; bus bytes "
                      f"warmup={meters['warmup'].bus_bytes:.0f} compressed={meters['compressed'].bus_bytes:.0f} "
                      f"ratio=1/{1 / ratio:.2f}")
    finish()


if __name__ == "__main__":
    main()
