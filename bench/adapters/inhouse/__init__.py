"""The `inhouse` adapter: TrainBench's own implementations (impl/), one plan file per parallelism."""
