"""Gemma / Gemma 2 decoder with PaliGemma's prefix-LM mask and a preallocated KV cache."""

from __future__ import annotations

import numpy as np

from refpg.backend import attention, geglu, linear, rms_norm, rope, softcap, zeros_beside
from refpg.config import TextConfig
from refpg.errors import InputError
from refpg.ops import rope_cos_sin
from refpg.tap import tap
from refpg.weights import TextLayer, TextWeights

F32 = np.float32


class KVCache:
    """Keys/values of every layer for `batch_size` rows and up to `max_len` positions.

    Besides K and V it remembers, per cached slot, whether the key is real (not padding) and
    whether it belongs to the prefix (token_type 0), and per row the next position id.
    """

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int):
        if batch_size < 1 or max_len < 1:
            raise InputError(f"KV cache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
        self.shape = (batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim)
        # [B, max_len, kv_heads, hd] per layer, allocated by the first append beside the keys it holds
        self.k: list = [None] * cfg.num_hidden_layers
        self.v: list = [None] * cfg.num_hidden_layers
        self.key_valid = np.zeros((batch_size, max_len), bool)
        self.key_prefix = np.zeros((batch_size, max_len), bool)
        self.next_position = np.ones(batch_size, np.int64)  # PaliGemma's positions start at 1
        self.length = 0
        self.batch_size = batch_size
        self.max_len = max_len

    def reserve(self, valid: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """Claim slots for T new tokens; returns their position ids [B, T]. Call once per forward."""
        T = valid.shape[1]
        if self.length + T > self.max_len:
            raise InputError(f"KV cache is full: {self.length} cached + {T} new tokens > max_len {self.max_len}")
        s = slice(self.length, self.length + T)
        self.key_valid[:, s] = valid
        self.key_prefix[:, s] = prefix
        # position of a token = number of real tokens up to and including it (padding does not count)
        positions = self.next_position[:, None] - 1 + np.cumsum(valid, axis=1)
        self.next_position += valid.sum(axis=1)
        return positions

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v [B, T, kv_heads, hd] after the cached slots; return all keys/values so far."""
        end = self.length + k.shape[1]
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = zeros_beside(k, self.shape), zeros_beside(v, self.shape)
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def commit(self, T: int) -> None:
        """The forward pass is done: the T reserved slots are now part of the cache."""
        self.length += T


def prefix_lm_mask(key_valid: np.ndarray, key_prefix: np.ndarray, start: int, T: int,
                   sliding_window: int | None = None) -> np.ndarray:
    """[B, T, S] bool: may query slot start+i see key slot j?

    Causal (j <= i), except that prefix tokens (image + prompt) see the whole prefix, also ahead of
    themselves. A sliding window limits only the causal part: the prefix stays visible to itself.
    Padding keys are never visible.
    """
    S = start + T
    i = np.arange(start, S)[:, None]  # [T, 1] query slots
    j = np.arange(S)[None, :]  # [1, S] key slots
    causal = j <= i
    if sliding_window is not None:
        causal &= j > i - sliding_window
    both_prefix = key_prefix[:, start:S, None] & key_prefix[:, None, :S]  # [B, T, S]
    return (causal[None] | both_prefix) & key_valid[:, None, :S]


def self_attention(x: np.ndarray, layer: TextLayer, cfg: TextConfig, cos: np.ndarray, sin: np.ndarray,
                   mask: np.ndarray, cache: KVCache, i: int) -> np.ndarray:
    """RoPE'd MQA/GQA attention over the cache. [B, T, H] -> [B, T, H]."""
    B, T, _ = x.shape
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = linear(x, layer.q_proj.weight).reshape(B, T, heads, hd)
    k = linear(x, layer.k_proj.weight).reshape(B, T, kv_heads, hd)
    v = linear(x, layer.v_proj.weight).reshape(B, T, kv_heads, hd)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    keys, values = cache.append(i, k, v)  # [B, S, kv_heads, hd]
    scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
    out = attention(q, keys, values, mask, scale, cfg.attn_logit_softcapping)  # [B, T, heads, hd]
    return linear(out.reshape(B, T, heads * hd), layer.o_proj.weight)


def mlp(x: np.ndarray, layer: TextLayer) -> np.ndarray:
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)). [B, T, H] -> [B, T, H]."""
    gate = linear(x, layer.gate_proj.weight)  # [B, T, F]
    up = linear(x, layer.up_proj.weight)  # [B, T, F]
    return linear(geglu(gate, up), layer.down_proj.weight)


def decoder_layer(x: np.ndarray, layer: TextLayer, cfg: TextConfig, cos: np.ndarray, sin: np.ndarray,
                  mask: np.ndarray, cache: KVCache, i: int) -> np.ndarray:
    """Gemma: x + attn(norm(x)); x + mlp(norm(x)). Gemma 2 also norms each branch's output."""
    eps = cfg.rms_norm_eps
    h = rms_norm(x, layer.input_layernorm.weight, eps)
    attn_out = tap(f"text.{i}.attn_out", self_attention(h, layer, cfg, cos, sin, mask, cache, i))
    if layer.post_feedforward_layernorm is not None:  # Gemma 2 sandwich norms
        x = x + tap(f"text.{i}.post_attn_norm", rms_norm(attn_out, layer.post_attention_layernorm.weight, eps))
        mlp_out = tap(f"text.{i}.mlp_out", mlp(rms_norm(x, layer.pre_feedforward_layernorm.weight, eps), layer))
        return x + tap(f"text.{i}.post_ff_norm", rms_norm(mlp_out, layer.post_feedforward_layernorm.weight, eps))
    x = x + attn_out
    mlp_out = tap(f"text.{i}.mlp_out", mlp(rms_norm(x, layer.post_attention_layernorm.weight, eps), layer))
    return x + mlp_out


def decoder(x: np.ndarray, valid: np.ndarray, prefix: np.ndarray, w: TextWeights, cfg: TextConfig,
            cache: KVCache) -> np.ndarray:
    """Input embeddings [B, T, H] -> final-normed hidden states [B, T, H]; appends to the cache.

    valid [B, T]: real token (not padding); prefix [B, T]: token_type 0 (image + prompt).
    """
    T = x.shape[1]
    start = cache.length
    positions = cache.reserve(valid, prefix)  # [B, T]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # [B, T, hd]
    full = prefix_lm_mask(cache.key_valid, cache.key_prefix, start, T)  # [B, T, S]
    sliding = (prefix_lm_mask(cache.key_valid, cache.key_prefix, start, T, cfg.sliding_window)
               if cfg.sliding_window is not None else full)
    for i, layer in enumerate(w.layers):
        mask = sliding if cfg.layer_types and cfg.layer_types[i] == "sliding_attention" else full
        x = tap(f"text.{i}", decoder_layer(x, layer, cfg, cos, sin, mask, cache, i))
    cache.commit(T)
    return tap("text.norm", rms_norm(x, w.norm.weight, cfg.rms_norm_eps))


def logits(h: np.ndarray, w: TextWeights, cfg: TextConfig) -> np.ndarray:
    """Tied LM head (+ Gemma 2's final soft-cap). [B, T, H] -> [B, T, V]."""
    return tap("logits", softcap(linear(h, w.lm_head), cfg.final_logit_softcapping))
