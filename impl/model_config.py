"""Decoder shapes: the presets and their parameter counts (pure Python, no torch,
so validation, theory and reports never import torch)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(kw_only=True, frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def as_dict(self) -> dict:
        return asdict(self)


# Presets of one decoder. `tiny` is for CPU tests (~0.35M parameters).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=1024, dim=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=192),
    "small": ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=768),
    "gpt2-124m": ModelConfig(vocab_size=50304, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048),
    "llama-1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192),
    "llama-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    # Long-sequence variants for sparse attention (suites/sparse_attention.yaml, gpu-1x).
    "tiny-long": ModelConfig(vocab_size=1024, dim=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=192,
                             max_seq_len=16384),
    "gpt2-124m-long": ModelConfig(vocab_size=50304, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                                  max_seq_len=32768),
    # Many thin blocks and a small vocabulary, so pipeline stages can be cut evenly: the
    # head + loss (V·D = 256·128) costs a fraction of one block (13·D²), and 16 blocks
    # split 8 + 8 or 4 × 4 by parameters and by time (the pipeline bubble against (p−1)/m).
    "deep": ModelConfig(vocab_size=256, dim=128, n_layers=16, n_heads=4, n_kv_heads=4, ffn_dim=384),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls (all Linear weights incl. the LM head;
    not the embedding lookup or the norms). Used by the FLOPs formula."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.dim * cfg.ffn_dim
    return cfg.n_layers * (attn + mlp) + cfg.dim * cfg.vocab_size


def total_params(cfg: ModelConfig) -> int:
    return matmul_params(cfg) + cfg.vocab_size * cfg.dim + (2 * cfg.n_layers + 1) * cfg.dim


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in ``Decoder.named_parameters()`` order
    (nn.Linear weights are (out, in)). Lets theory size per-tensor optimizer
    state (Adafactor's factored moments, 8-bit Adam's blocks) without torch."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,),
            p + "attention.wq.weight": (cfg.n_heads * hd, d),
            p + "attention.wk.weight": (cfg.n_kv_heads * hd, d),
            p + "attention.wv.weight": (cfg.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, cfg.n_heads * hd),
            p + "ffn_norm.weight": (d,),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w3.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
        })
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (cfg.vocab_size, d)
    return shapes
