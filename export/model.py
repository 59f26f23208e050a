"""The export-friendly Llama 3 decoder: explicit past key/value tensors in, present key/values out.

Shapes: B batch, S new tokens, P past tokens, T = P + S, H query heads, K key/value heads,
D head_dim, E hidden, I intermediate, V vocabulary.

Linear weights are stored [in, out] (transposed from Hugging Face) so the ONNX graph holds plain
MatMul(x, W) with constant W, which ONNX Runtime prepacks and weight-only quantizers expect.
RMSNorm, RoPE and softmax run in fp32 whatever the weight dtype; masks use finite values.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from llama3_deploy.config import LlamaConfig

# Added to masked attention scores (in fp32): finite, so fully padded rows give a uniform softmax, never NaN.
MASK_VALUE = torch.finfo(torch.float32).min

# Buffers computed from the config rather than read from the checkpoint.
ROPE_INV_FREQ = "rope_inv_freq"


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """[D/2] fp32 inverse frequencies, with Llama 3.1 scaling; same fp32 arithmetic as transformers."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D] in any dtype; cos/sin [B, 1, S, D] fp32. Math in fp32, result in x's dtype."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.wq = nn.Parameter(torch.empty(c.hidden_size, c.q_size))   # [E, H*D]
        self.wk = nn.Parameter(torch.empty(c.hidden_size, c.kv_size))  # [E, K*D]
        self.wv = nn.Parameter(torch.empty(c.hidden_size, c.kv_size))  # [E, K*D]
        self.wo = nn.Parameter(torch.empty(c.q_size, c.hidden_size))   # [H*D, E]

    def forward(self, x, cos, sin, mask, past_k, past_v):
        # x [B, S, E]; mask [B, 1, S, T] fp32 additive; past_k/v [B, K, P, D]
        b, s, _ = x.shape
        q = (x @ self.wq).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = (x @ self.wk).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)     # [B, K, S, D]
        v = (x @ self.wv).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)     # [B, K, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all = torch.cat([past_k, k], dim=2)  # [B, K, T, D]
        v_all = torch.cat([past_v, v], dim=2)  # [B, K, T, D]
        groups = self.n_heads // self.n_kv
        k_rep = k_all.repeat_interleave(groups, dim=1) if groups > 1 else k_all  # [B, H, T, D]
        v_rep = v_all.repeat_interleave(groups, dim=1) if groups > 1 else v_all
        scores = (q @ k_rep.transpose(2, 3)).float() / math.sqrt(self.head_dim) + mask  # [B, H, S, T] fp32
        probs = torch.softmax(scores, dim=-1).to(x.dtype)
        out = (probs @ v_rep).transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)  # [B, S, H*D]
        return out @ self.wo, k_all, v_all


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(c.hidden_size, c.intermediate_size))  # [E, I]
        self.w_up = nn.Parameter(torch.empty(c.hidden_size, c.intermediate_size))    # [E, I]
        self.w_down = nn.Parameter(torch.empty(c.intermediate_size, c.hidden_size))  # [I, E]

    def forward(self, x):
        return (nn.functional.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        a, k_all, v_all = self.attn(self.attn_norm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), k_all, v_all


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor):
    """position_ids [B, S] -> cos, sin [B, 1, S, D] in fp32."""
    freqs = position_ids.float()[:, :, None] * inv_freq[None, None, :]  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)                              # [B, S, D]
    return emb.cos()[:, None], emb.sin()[:, None]


def additive_mask(attention_mask: torch.Tensor, past_len, seq_len) -> torch.Tensor:
    """attention_mask [B, T] (1 keep, 0 pad) -> [B, 1, S, T] fp32: 0 where attended, MASK_VALUE elsewhere."""
    total = attention_mask.shape[1]
    q_pos = torch.arange(seq_len, device=attention_mask.device) + past_len  # [S] absolute query positions
    k_pos = torch.arange(total, device=attention_mask.device)               # [T]
    causal = k_pos[None, :] <= q_pos[:, None]                                # [S, T]
    allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)    # [B, 1, S, T]
    return torch.where(allowed, 0.0, MASK_VALUE)  # python scalars: fp32, no constant tensors in the trace


class LlamaDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits fp32, *present).

    past/present are flat, ordered (key_0, value_0, key_1, value_1, ...), as in the I/O contract.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))  # [V, E]
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(config.hidden_size, config.vocab_size))  # [E, V]
        self.register_buffer(ROPE_INV_FREQ, torch.empty(config.head_dim // 2, dtype=torch.float32))

    def head_weight(self) -> torch.Tensor:
        return self.embed.t() if self.config.tie_word_embeddings else self.lm_head  # [E, V]

    def forward(self, input_ids, attention_mask, position_ids, *past):
        # input_ids, position_ids [B, S] int64; attention_mask [B, T] int64; past: 2L x [B, K, P, D]
        seq_len, past_len = input_ids.shape[1], past[0].shape[2]
        x = nn.functional.embedding(input_ids, self.embed)  # [B, S, E]
        cos, sin = rope_cos_sin(getattr(self, ROPE_INV_FREQ), position_ids)
        mask = additive_mask(attention_mask, past_len, seq_len)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k_all, v_all = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k_all, v_all]
        logits = (self.norm(x) @ self.head_weight()).float()  # [B, S, V]
        return (logits, *presents)

    def empty_past(self, batch: int, dtype: torch.dtype | None = None, device=None) -> list[torch.Tensor]:
        """Zero-length past tensors [B, K, 0, D] for a prefill."""
        c = self.config
        dtype = dtype or self.embed.dtype
        return [torch.zeros(batch, c.num_key_value_heads, 0, c.head_dim, dtype=dtype, device=device)
                for _ in range(2 * c.num_hidden_layers)]
