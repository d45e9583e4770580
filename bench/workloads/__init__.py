"""What a cell runs: the training data and optimizer settings every adapter shares (``train``), and the micro-benchmark workloads (``allreduce``, ``attention``)."""
