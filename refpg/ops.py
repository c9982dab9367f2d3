"""The primitive ops of PaliGemma in NumPy: the reference every other backend is checked against.

Every op takes and returns float32 arrays. Shapes use B batch, T query tokens, S key tokens,
D/H model width, heads/kv_heads attention heads, hd head dimension.
"""

from __future__ import annotations

import math

import numpy as np

from refpg.formats import Matrix, to_float32

F32 = np.float32


def linear(x: np.ndarray, weight: Matrix, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W.T + b, W [out, in] as in the checkpoint, in any weight format."""
    y = x @ to_float32(weight).T  # [..., in] -> [..., out]
    if bias is not None:
        y += bias
    return y


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (SigLIP): (x - mean) / sqrt(var + eps) * w + b."""
    mean = x.mean(-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(-1, keepdims=True)
    return centered / np.sqrt(var + F32(eps)) * weight + bias


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Gemma's RMSNorm: x / sqrt(mean(x²) + eps) * (1 + w) — note the 1 + w."""
    ms = (x * x).mean(-1, keepdims=True)
    return x / np.sqrt(ms + F32(eps)) * (F32(1) + weight)


_SQRT_2_OVER_PI = F32(math.sqrt(2.0 / math.pi))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """gelu, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    return F32(0.5) * x * (F32(1) + np.tanh(_SQRT_2_OVER_PI * (x + F32(0.044715) * x * x * x)))


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Gemma's gated MLP activation: gelu_tanh(gate) * up."""
    return gelu_tanh(gate) * up


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    x = x - x.max(axis=axis, keepdims=True)  # subtract the max: exp never overflows
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """Gemma 2's soft-capping: cap · tanh(x / cap) (identity when cap is None)."""
    if cap is None:
        return x
    return F32(cap) * np.tanh(x / F32(cap))


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables for rotate-half RoPE: angle[p, j] = p · theta^(-2j/hd), repeated twice."""
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(F32) / F32(head_dim)))).astype(F32)
    # positions are integers: cast them to float32 first, or the product silently becomes float64
    angles = positions.astype(F32)[..., None] * inv_freq  # [..., hd/2]
    emb = np.concatenate([angles, angles], axis=-1)  # [..., hd]
    return np.cos(emb), np.sin(emb)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding, rotate-half convention. x [B, T, heads, hd]; cos/sin [B, T, hd]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half(x)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float,
              logit_softcap: float | None = None) -> np.ndarray:
    """Masked multi-/grouped-query attention.

    q [B, T, heads, hd]; k, v [B, S, kv_heads, hd]; mask [B, T, S] bool (True = may attend) or None
    (every key visible, as in SigLIP).
    Query head h reads kv head h // (heads / kv_heads). Returns [B, T, heads, hd].
    """
    B, T, heads, hd = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    qg = q.reshape(B, T, kv_heads, group, hd).transpose(0, 2, 3, 1, 4)  # [B, kv, group, T, hd]
    kt = k.transpose(0, 2, 3, 1)[:, :, None]  # [B, kv, 1, hd, S]
    vg = v.transpose(0, 2, 1, 3)[:, :, None]  # [B, kv, 1, S, hd]
    scores = (qg @ kt) * F32(scale)  # [B, kv, group, T, S]
    scores = softcap(scores, logit_softcap)
    # A masked score gets the most negative float, not -inf: a row with no visible key (a padding
    # query) then stays finite instead of turning into NaN and poisoning later layers.
    if mask is not None:
        scores = np.where(mask[:, None, None], scores, np.finfo(F32).min)
    probs = softmax(scores, axis=-1)
    out = probs @ vg  # [B, kv, group, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, heads, hd)


def embedding(table: Matrix, ids: np.ndarray) -> np.ndarray:
    """Row lookup: table [V, D] in any weight format, ids [B, T] -> [B, T, D] float32."""
    rows = to_float32(table.rows(np.reshape(ids, -1)))  # [B·T, D]
    return rows.reshape(*np.shape(ids), table.shape[1])
