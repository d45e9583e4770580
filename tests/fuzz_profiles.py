"""Hypothesis budgets for the fuzz tests: `ci` (default: fixed seed, bounded
examples, ~1 min in all) and `nightly` (10× the examples, a seed per night).
Choose with TRAINBENCH_FUZZ=nightly; the nightly workflow sets it."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                                        HealthCheck.function_scoped_fixture],
           "database": None, "print_blob": True}
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("nightly", derandomize=False, **_COMMON)
PROFILE = os.environ.get("TRAINBENCH_FUZZ", "ci")
settings.load_profile(PROFILE)


def examples(ci: int) -> int:
    """max_examples for a property: ``ci`` in CI, 10× that nightly."""
    return ci * 10 if PROFILE == "nightly" else ci
