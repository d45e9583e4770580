"""Planning: the auto-parallel search and cost model, the machine profile and its calibration, the pre-launch memory fit, and the comparison with DeepSpeed's autotuner."""
