"""SigLIP vision tower and the PaliGemma projector: image [3, S, S] -> N embeddings in the text width."""

from __future__ import annotations

import numpy as np

from refpg.backend import attention, gelu_tanh, layer_norm, linear
from refpg.config import VisionConfig
from refpg.tap import tap
from refpg.weights import Linear, VisionLayer, VisionWeights


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[B, C, S, S] -> [B, N, C*P*P]: patches row-major, each channel-major (a stride-P conv's view)."""
    B, C, S, _ = pixels.shape
    g = S // patch
    x = pixels.reshape(B, C, g, patch, g, patch)  # [B, C, gy, py, gx, px]
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * patch * patch)


def embeddings(pixels: np.ndarray, w: VisionWeights, cfg: VisionConfig) -> np.ndarray:
    """Patch embedding + learned position embedding. [B, 3, S, S] -> [B, N, D]."""
    x = linear(patchify(pixels, cfg.patch_size), w.patch_embedding.weight, w.patch_embedding.bias)
    return x + w.position_embedding


def self_attention(x: np.ndarray, layer: VisionLayer, cfg: VisionConfig) -> np.ndarray:
    """Full (unmasked) multi-head attention with biased projections. [B, N, D] -> [B, N, D]."""
    B, N, D = x.shape
    heads, hd = cfg.num_attention_heads, cfg.head_dim
    q = linear(x, layer.q_proj.weight, layer.q_proj.bias).reshape(B, N, heads, hd)
    k = linear(x, layer.k_proj.weight, layer.k_proj.bias).reshape(B, N, heads, hd)
    v = linear(x, layer.v_proj.weight, layer.v_proj.bias).reshape(B, N, heads, hd)
    out = attention(q, k, v, None, scale=hd ** -0.5).reshape(B, N, D)  # no mask: every patch sees all
    return linear(out, layer.out_proj.weight, layer.out_proj.bias)


def mlp(x: np.ndarray, layer: VisionLayer) -> np.ndarray:
    """fc1 -> gelu (tanh) -> fc2. [B, N, D] -> [B, N, D]."""
    h = gelu_tanh(linear(x, layer.fc1.weight, layer.fc1.bias))  # [B, N, F]
    return linear(h, layer.fc2.weight, layer.fc2.bias)


def encoder_layer(x: np.ndarray, layer: VisionLayer, cfg: VisionConfig, i: int) -> np.ndarray:
    """Pre-LN transformer block: x + attn(LN1(x)), then + mlp(LN2(x))."""
    eps = cfg.layer_norm_eps
    attn_out = tap(f"vision.{i}.attn_out", self_attention(
        layer_norm(x, layer.layer_norm1.weight, layer.layer_norm1.bias, eps), layer, cfg))
    x = x + attn_out
    mlp_out = tap(f"vision.{i}.mlp_out", mlp(layer_norm(x, layer.layer_norm2.weight, layer.layer_norm2.bias, eps), layer))
    return x + mlp_out


def vision_tower(pixels: np.ndarray, w: VisionWeights, cfg: VisionConfig) -> np.ndarray:
    """[B, 3, S, S] -> [B, N, D], after the post-LayerNorm (SigLIP's pooling head is not used)."""
    x = tap("vision.embeddings", embeddings(pixels, w, cfg))
    for i, layer in enumerate(w.layers):
        x = tap(f"vision.{i}", encoder_layer(x, layer, cfg, i))
    return tap("vision.post_layernorm",
               layer_norm(x, w.post_layernorm.weight, w.post_layernorm.bias, cfg.layer_norm_eps))


def project(features: np.ndarray, projector: Linear) -> np.ndarray:
    """Linear projector into the text model's width. [B, N, D] -> [B, N, H]."""
    return tap("projector", linear(features, projector.weight, projector.bias))
