"""The `colossalai` adapter: the Booster with TorchDDP, TorchFSDP and HybridParallel plugins."""
