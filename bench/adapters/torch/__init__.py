"""The `torch` adapter: DDP, ZeroRedundancyOptimizer, FSDP1/FSDP2, DTensor TP and torch.distributed.pipelining."""
