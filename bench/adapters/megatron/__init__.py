"""Megatron-Core 0.16.1 adapter (imported on demand by bench.adapters)."""
