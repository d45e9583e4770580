"""Auto-parallelism: a calibrated cost model (``cost_model``), its machine
profile (``profile``, ``calibrate``) and a pruned search over dp × tp × pp,
micro-batches, ZeRO stage, offload and checkpointing (``search``)."""
