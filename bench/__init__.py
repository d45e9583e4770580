"""TrainBench: the harness. Layers (see README "Architecture"): config → run → adapters → meters → results → analysis; plan and theory beside them."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
"""The source tree this package was imported from (ranks start here; sbatch scripts cd here)."""
