"""The decoder as transformers' ``LlamaForCausalLM``, for Colossal-AI's
HybridParallelPlugin (its shardformer only shards transformers models).

Same config, same weights, same math as ``impl.model.Decoder``: RMSNorm with the
same eps (fp32 normalisation, weight after the cast back), SwiGLU FFN
(gate = w1, up = w3, down = w2), no biases, untied head, RoPE with the same
theta. One difference in layout: ``impl.model.apply_rope`` rotates
interleaved channel pairs (2i, 2i+1), HF's ``rotate_half`` rotates the halves
(i, i + hs/2). Permuting each head's q and k output rows to
[0, 2, 4, …, hs−2, 1, 3, …, hs−1] turns one into the other (pair i keeps
frequency i), and q·k is unchanged because q and k get the same permutation.
"""
from __future__ import annotations

import torch

from impl.model import Decoder

MODEL_TYPE = "transformers LlamaForCausalLM (same config and weights)"


def llama_config(decoder: Decoder):
    from transformers import LlamaConfig

    cfg = decoder.cfg
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, attention_dropout=0.0, use_cache=False,
        attn_implementation="eager", torch_dtype=torch.float32,
    )


def _interleaved_to_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(n * hs, D) rows, per head, from pair order (2i, 2i+1) to half order."""
    perm = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return w.view(-1, head_dim, w.shape[-1])[:, perm].reshape(w.shape)


@torch.no_grad()
def to_llama(decoder: Decoder):
    """A ``LlamaForCausalLM`` holding copies of ``decoder``'s weights (fp32, on its device)."""
    from transformers import LlamaForCausalLM

    hd = decoder.cfg.head_dim
    hf = LlamaForCausalLM(llama_config(decoder)).to(decoder.output.weight.device)
    hf.model.embed_tokens.weight.copy_(decoder.tok_embeddings.weight)
    for ours, theirs in zip(decoder.layers, hf.model.layers, strict=True):
        a, m = ours.attention, ours.feed_forward
        theirs.input_layernorm.weight.copy_(ours.attention_norm.weight)
        theirs.self_attn.q_proj.weight.copy_(_interleaved_to_halves(a.wq.weight, hd))
        theirs.self_attn.k_proj.weight.copy_(_interleaved_to_halves(a.wk.weight, hd))
        theirs.self_attn.v_proj.weight.copy_(a.wv.weight)
        theirs.self_attn.o_proj.weight.copy_(a.wo.weight)
        theirs.post_attention_layernorm.weight.copy_(ours.ffn_norm.weight)
        theirs.mlp.gate_proj.weight.copy_(m.w1.weight)
        theirs.mlp.up_proj.weight.copy_(m.w3.weight)
        theirs.mlp.down_proj.weight.copy_(m.w2.weight)
    hf.model.norm.weight.copy_(decoder.norm.weight)
    hf.lm_head.weight.copy_(decoder.output.weight)
    return hf
