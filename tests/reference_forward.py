"""A straightforward, cache-free forward of the model with an explicit boolean attention mask.

It re-derives the layer math of docs/reference-model.md §4 from the module weights (RMSNorm, RoPE rotate-half, Llama-4
query scaling after RoPE, GQA, SwiGLU) so that the package's forward (cache, masks, per-call mode) can be checked
against it. Only the RoPE inverse frequencies are taken from the model's rotary module (their YaRN derivation is
tested separately against the formula).
"""

import math

import torch


def rms_norm(x, weight, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_logits(model, input_ids, positions, allowed):
    """
    input_ids: [B, T]; positions: [B, T] absolute positions; allowed: [B, T, T] bool, allowed[b, q, k] = query q may
    attend to key k. Returns logits [B, T, V] (every position).
    """
    config = model.config
    encoder = model.encoder
    rope = config.rope_parameters
    beta = rope["llama_4_scaling_beta"]
    original = rope["original_max_position_embeddings"]
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    batch, length = input_ids.shape

    inv_freq = encoder.rotary_emb.inv_freq.float()
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1) * encoder.rotary_emb.attention_scaling
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, D]
    query_scale = (1 + beta * torch.log1p(torch.floor(positions.float() / original)))[:, None, :, None]

    h = encoder.embed_tokens(input_ids)
    bias = torch.zeros(batch, 1, length, length)
    bias = bias.masked_fill(~allowed[:, None], -math.inf)
    for layer in encoder.layers:
        attn = layer.self_attn
        x = rms_norm(h, layer.input_layernorm.weight, config.rms_norm_eps)
        q = attn.q_proj(x).view(batch, length, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q = q * query_scale
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias
        weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0)  # fully masked (pad) queries give zeros
        out = (weights @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
        h = h + attn.o_proj(out)
        mlp = layer.mlp
        x = rms_norm(h, layer.post_attention_layernorm.weight, config.rms_norm_eps)
        h = h + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    h = rms_norm(h, encoder.norm.weight, config.rms_norm_eps)
    return model.diffusion_head(h)


def causal_allowed(padding_mask):
    """[B, T] 1/0 padding -> [B, T, T]: causal among real tokens."""
    length = padding_mask.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    return causal[None] & padding_mask.bool()[:, None, :]


def bidirectional_allowed(padding_mask):
    return padding_mask.bool()[:, None, :].expand(-1, padding_mask.shape[1], -1).clone()


def positions_from_mask(padding_mask):
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
