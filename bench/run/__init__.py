"""Running cells: the runner (repeat, resume, classify), launchers (torchrun, SLURM), the worker every rank runs, and the append-only results store."""
