"""The false-alarm and detection rates of `bench compare` on this machine
(README "Launch statistics"). Reads runs made with, e.g.:

    bench run aa.yaml --repeat 5 --run-id aa1 … aa6        # the same suite 6 times
    bench run ab.yaml --repeat 20 --run-id ab1             # fault: [none, slow], interleaved

A/A: every ordered pair of the aa runs through `bench compare`'s verdict, per
cell: the share called a regression. Detection: launch medians of the `none`
and `slow` (+20 % per step) cells of the ab run; random subsets of k launches
per side (k = 3, 5, 10), the share called a regression at the given threshold;
a 10 % slowdown is simulated by scaling the `none` cell's launch medians of one
side by 1.1 (drawn from disjoint launches)."""
from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

from bench.analysis.compare import compare, launch_medians, time_verdict
from bench.run.results import read_records


def a_a(paths: list[Path], alpha: float, threshold: float) -> tuple[int, int, dict[str, int]]:
    verdicts: dict[str, int] = {}
    for base, cand in itertools.permutations(paths, 2):
        for f in compare(base, cand, alpha=alpha, time_threshold=threshold):
            if f.metric == "step_time_s":
                verdicts[f.verdict] = verdicts.get(f.verdict, 0) + 1
    total = sum(verdicts.values())
    return verdicts.get("regression", 0), total, verdicts


def detection(ab: Path, k: int, alpha: float, threshold: float, trials: int, scale: float | None) -> float:
    recs = {r["config"]["fault"]: r for r in read_records(ab)}
    plain, slow = launch_medians(recs["none"]), launch_medians(recs["slow"])
    rng, hits = random.Random(k), 0
    for _ in range(trials):
        if scale is None:
            base, cand = rng.sample(plain, k), rng.sample(slow, k)
        else:  # disjoint launches of the plain cell, one side scaled
            both = rng.sample(plain, 2 * k)
            base, cand = both[:k], [x * scale for x in both[k:]]
        hits += time_verdict(base, cand, alpha=alpha, threshold=threshold, seed=rng.randrange(2**31))[0] == "regression"
    return hits / trials


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("aa", nargs="+", type=Path)
    p.add_argument("--ab", type=Path, required=True)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--trials", type=int, default=200)
    a = p.parse_args()
    false, total, verdicts = a_a(a.aa, a.alpha, a.threshold)
    print(f"A/A: {false}/{total} cell comparisons called a regression ({false / total:.1%}); verdicts {verdicts}")
    for k in (3, 5, 10):
        d20 = detection(a.ab, k, a.alpha, a.threshold, a.trials, None)
        d10 = detection(a.ab, k, a.alpha, a.threshold, a.trials, 1.10) if 2 * k <= 20 else float("nan")
        print(f"{k:2d} launches per side: 20 % slowdown detected {d20:.0%}, 10 % slowdown {d10:.0%}")


if __name__ == "__main__":
    main()
