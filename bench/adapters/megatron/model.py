"""The project's decoder as a Megatron-Core ``GPTModel``: same math, same weights.

Megatron is configured for this decoder (RMSNorm, SwiGLU, RoPE on interleaved
channel pairs, grouped-query attention, untied head, no biases, no dropout) and
each rank's model chunks receive their shards of the in-house model's initial
weights, so fp32 losses agree with the single-process reference.

Layouts (per tensor-parallel rank r of t):

* ``linear_qkv`` (fused): query groups g of this rank, each [its n_heads/n_kv
  query heads, its key head, its value head] of head_dim rows;
* ``linear_fc1`` (gated): [w1 rows of shard r; w3 rows of shard r] — Megatron
  splits the local output in two halves, silu(first) · second;
* ``linear_proj`` (wo) and ``linear_fc2`` (w2): row-parallel, input columns of shard r;
* embedding and output layer: vocabulary rows of shard r; norms whole.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bench.config.knobs import Knobs
from impl.model import Decoder


def transformer_config(knobs: Knobs, cfg: Any, dtype: torch.dtype) -> Any:
    """Megatron's ``TransformerConfig`` for this decoder and cell."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    vp = knobs.virtual_stages if knobs.pp > 1 and knobs.pp_schedule == "interleaved" else None
    recompute: dict[str, Any] = {}
    if knobs.checkpointing == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": knobs.checkpoint_every}
    elif knobs.checkpointing == "selective":
        recompute = {"recompute_granularity": "selective"}  # Megatron's default module: core_attn
    return TransformerConfig(
        num_layers=cfg.n_layers, hidden_size=cfg.dim, num_attention_heads=cfg.n_heads,
        num_query_groups=cfg.n_kv_heads, ffn_hidden_size=cfg.ffn_dim, kv_channels=cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, rotary_interleaved=True,
        init_method_std=cfg.init_std, use_cpu_initialization=True, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=knobs.precision == "bf16", fp16=knobs.precision == "fp16",
        tensor_model_parallel_size=knobs.tp, sequence_parallel=knobs.sequence_parallel == "megatron",
        pipeline_model_parallel_size=knobs.pp, virtual_pipeline_model_parallel_size=vp,
        # Fusions that need apex/Transformer Engine kernels; off, so the same code runs on CPU and CUDA.
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, **recompute,
    )


def layer_spec() -> Any:
    """Megatron's local (pure Megatron-Core) GPT layer with RMSNorm, its norms
    replaced by ``SequenceParallelRMSNorm``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    return spec


def block_spec(config: Any, vp_stage: int | None) -> Any:
    """The transformer block of one model chunk, final norm included."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = layer_spec()
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=SequenceParallelRMSNorm)


class SequenceParallelRMSNorm:
    """``torch.nn.RMSNorm`` whose weight carries ``sequence_parallel`` as apex's
    FusedLayerNorm sets it: Megatron's ``finalize_model_grads`` then all-reduces
    its gradient over the tensor-parallel group. Megatron's own torch fallback
    (``WrappedTorchNorm``) refuses sequence parallelism; with apex or Transformer
    Engine absent this is the only RMSNorm that runs it."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.RMSNorm:
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def build_chunks(config: Any, cfg: Any) -> list[Any]:
    """This rank's model chunks (one, or v under the interleaved schedule)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    vp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for v in range(vp or 1):
        stage = v if vp else None
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=block_spec(config, stage), vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.max_seq_len, position_embedding_type="rope", rotary_base=int(cfg.rope_theta),
            share_embeddings_and_output_weights=False,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage))
    return chunks


@torch.no_grad()
def copy_weights(chunks: list[Any], ref: Decoder, tp: int, tp_rank: int) -> int:
    """Copy the in-house model's weights into this rank's shards; returns the
    number of tensors copied (every parameter of every chunk, checked)."""
    cfg = ref.cfg
    hd, nq, ng = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    shard = lambda w, dim: w.chunk(tp, dim)[tp_rank]  # noqa: E731
    copied = 0

    def put(dst: torch.Tensor, src: torch.Tensor) -> None:
        nonlocal copied
        if dst.shape != src.shape:
            raise ValueError(f"Megatron shard {tuple(dst.shape)} ≠ in-house shard {tuple(src.shape)}")
        dst.copy_(src)
        copied += 1

    for chunk in chunks:
        if chunk.pre_process:
            put(chunk.embedding.word_embeddings.weight, shard(ref.tok_embeddings.weight, 0))
        if chunk.post_process:
            put(chunk.output_layer.weight, shard(ref.output.weight, 0))
            put(chunk.decoder.final_layernorm.weight, ref.norm.weight)
        for layer in chunk.decoder.layers:
            src = ref.layers[layer.layer_number - 1]
            a, f = src.attention, src.feed_forward
            q = a.wq.weight.view(ng, nq // ng * hd, -1)
            qkv = torch.cat([q, a.wk.weight.view(ng, hd, -1), a.wv.weight.view(ng, hd, -1)], 1)
            put(layer.self_attention.linear_qkv.weight, shard(qkv, 0).reshape(-1, cfg.dim))
            put(layer.self_attention.linear_proj.weight, shard(a.wo.weight, 1))
            put(layer.input_layernorm.weight, src.attention_norm.weight)
            put(layer.pre_mlp_layernorm.weight, src.ffn_norm.weight)
            put(layer.mlp.linear_fc1.weight, torch.cat([shard(f.w1.weight, 0), shard(f.w3.weight, 0)], 0))
            put(layer.mlp.linear_fc2.weight, shard(f.w2.weight, 1))
    expected = sum(1 for c in chunks for _ in c.parameters())
    if copied != expected:
        raise ValueError(f"copied {copied} of {expected} Megatron parameters")
    return copied
