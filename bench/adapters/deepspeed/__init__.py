"""The `deepspeed` adapter: deepspeed.initialize (ZeRO 0-3, offload) and its PipelineEngine."""
