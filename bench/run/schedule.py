"""The order of launches: ``repeat`` rounds, each a seeded random permutation of
the cells, so drift on the machine (a slow spell, a warming cache) hits every
cell alike instead of the cells that happened to run during it (asv's
``--interleave-rounds``, Google Benchmark's random interleaving). No cell runs
twice in a row: where one round would end with the cell the next begins with,
the next round's first two cells swap."""
from __future__ import annotations

import random


def interleaved(cell_ids: list[str], repeat: int, seed: str) -> list[tuple[str, int]]:
    """(cell id, launch index) in launch order; launch k of every cell is in round k."""
    rng = random.Random(seed)
    order: list[tuple[str, int]] = []
    for k in range(repeat):
        round_ = list(cell_ids)
        rng.shuffle(round_)
        if order and len(round_) > 1 and round_[0] == order[-1][0]:
            round_[0], round_[1] = round_[1], round_[0]
        order += [(cell, k) for cell in round_]
    return order
