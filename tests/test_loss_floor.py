"""theory.loss_floor against the Bayes-optimal predictor of the source, computed
by brute force on batches the workload really draws: for each row and
position, every stride 1..S consistent with the tokens seen so far is equally
likely (the start is the first token), so p(next) = (consistent strides
predicting it) ÷ (consistent strides). Its mean −ln p over the predicted tokens
is the lowest expected loss any model can reach; the formula must equal it."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from bench.theory import loss_floor, predict
from bench.config.knobs import Knobs
from bench.theory.convergence import STRIDES
from bench.workloads.train import global_batch
from impl.model_config import model_config


def bayes_optimal_loss(cfg, *, batch_size: int, seq_len: int, batches: int) -> float:
    V, total, n = cfg.vocab_size, 0.0, 0
    for step in range(batches):
        b = global_batch(cfg, batch_size=batch_size, seq_len=seq_len, seed=3, step=step)
        for row_in, row_out in zip(b.inputs.tolist(), b.targets.tolist()):
            row = [row_in[0], *row_out]
            for j in range(1, len(row)):
                alive = [s for s in range(1, STRIDES + 1) if all((row[0] + s * i) % V == row[i] for i in range(j))]
                hits = sum((row[0] + s * j) % V == row[j] for s in alive)
                total -= math.log(hits / len(alive))
                n += 1
    return total / n


@pytest.mark.parametrize("vocab, seq_len", [(1024, 32), (1024, 7), (5, 16), (3, 4)])
def test_floor_is_the_bayes_optimal_loss(vocab, seq_len):
    cfg = replace(model_config("tiny"), vocab_size=vocab)
    # Strides collide mod V when V <= S (V = 5: 1 ≡ 6, 2 ≡ 7, 3 ≡ 8): the floor is then below ln S / T.
    want = bayes_optimal_loss(cfg, batch_size=16, seq_len=seq_len, batches=10)
    assert loss_floor(seq_len=seq_len, vocab_size=vocab, strides=STRIDES) == pytest.approx(want, rel=0.08 if vocab < 9 else 1e-12)


def test_floor_reaches_the_record():
    assert predict(Knobs(seq_len=32))["loss_floor"] == pytest.approx(math.log(8) / 32, rel=1e-12)
