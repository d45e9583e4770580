"""The loss floor of the default training source (bench.workloads.train.global_batch).

A row is t_i = (a + s·i) mod V, i = 0..T, with the start a uniform over V and
the stride s uniform over 1..S (S = ``STRIDES``), independent. The model
predicts t_1..t_T from the tokens before each. A predictor q's expected
cross-entropy is H(p) + D(p‖q) ≥ H(p), the conditional entropy of the target
given what it sees (the information inequality, D ≥ 0: Cover & Thomas,
*Elements of Information Theory*, 2nd ed., Thm 2.6.3), so the floor per
predicted token is the mean over the T positions of H(t_j | t_0..t_{j−1}):

- j = 1: t_1 − t_0 ≡ s (mod V), so H(t_1 | t_0) = H(s mod V): ln S when V > S
  (the S residues are distinct), less when strides collide mod V;
- j ≥ 2: t_1 − t_0 fixes s mod V, and t_j = t_{j−1} + s mod V is determined: 0.

    loss_floor = H(s mod V) / T        (nats per token; ln 8 / T for V > 8)

Pure Python, no torch.
"""
from __future__ import annotations

import math
from collections import Counter

STRIDES = 8
"""The default source's strides, 1..STRIDES, uniform: its definition, which
bench.workloads.train.global_batch draws from."""


def loss_floor(*, seq_len: int, vocab_size: int, strides: int) -> float:
    """Nats per predicted token no model can beat on the default source."""
    if seq_len < 1 or vocab_size < 1 or strides < 1:
        raise ValueError(f"seq_len, vocab_size and strides must be >= 1; got {seq_len}, {vocab_size}, {strides}")
    residues = Counter(s % vocab_size for s in range(1, strides + 1))
    first = -sum(n / strides * math.log(n / strides) for n in residues.values())
    return first / seq_len
