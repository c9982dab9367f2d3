"""refpg.ops, bf16 decoding, the prefix-LM mask and next-token sampling, each checked against its
formula written out again here (float64 math or a plain loop), over odd shapes.

Tolerances sit next to each comparison: float32 ops against float64 formulas agree to a few ulps
(rtol 1e-5 / atol 1e-6) unless a comment says why a case needs more.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from refpg import ops
from refpg.config import TextConfig
from refpg.gemma import KVCache, prefix_lm_mask
from refpg.formats import Format, Matrix, bf16_to_f32, f32_to_bf16
from refpg.sampling import pick_next

F32, F64 = np.float32, np.float64

# leading (batch) shapes and feature sizes, odd ones included
BATCH_SHAPES = [(), (1,), (3,), (2, 5)]
WIDTHS = [1, 2, 7, 64, 129]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(F32)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all(), "NaN/Inf in output"
    np.testing.assert_allclose(actual.astype(F64), expected, rtol=rtol, atol=atol)


# ---- linear ---------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("n_in, n_out", [(1, 1), (7, 3), (33, 65)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_x_times_w_transposed_plus_bias(rng, batch, n_in, n_out, with_bias):
    x, w = rand(rng, *batch, n_in), rand(rng, n_out, n_in)
    b = rand(rng, n_out) if with_bias else None
    xf = x.reshape(-1, n_in).astype(F64)
    expected = np.zeros((xf.shape[0], n_out))
    for n in range(xf.shape[0]):
        for o in range(n_out):
            expected[n, o] = sum(xf[n, i] * float(w[o, i]) for i in range(n_in)) + (float(b[o]) if with_bias else 0.0)
    assert_close(ops.linear(x, Matrix(w), b), expected.reshape(*batch, n_out), rtol=1e-5, atol=1e-5)


def test_linear_does_not_modify_its_inputs(rng):
    x, w, b = rand(rng, 3, 4), rand(rng, 5, 4), rand(rng, 5)
    copies = [a.copy() for a in (x, w, b)]
    ops.linear(x, Matrix(w), b)
    for a, c in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, c)


# ---- norms ----------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_layer_norm_matches_formula(rng, batch, width, eps):
    x, w, b = rand(rng, *batch, width, scale=3.0) + F32(2.0), rand(rng, width), rand(rng, width)
    x64 = x.astype(F64)
    mean = x64.mean(-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdims=True)  # population variance, as torch
    expected = (x64 - mean) / np.sqrt(var + eps) * w + b
    assert_close(ops.layer_norm(x, w, b, eps), expected, rtol=1e-5, atol=1e-5)


def test_layer_norm_of_a_constant_row_is_the_bias(rng):
    x, w, b = np.full((2, 9), 5.0, F32), rand(rng, 9), rand(rng, 9)
    assert_close(ops.layer_norm(x, w, b, 1e-6), np.broadcast_to(b.astype(F64), (2, 9)), atol=0)


@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_rms_norm_matches_formula_with_one_plus_w(rng, batch, width, eps):
    x, w = rand(rng, *batch, width, scale=2.0), rand(rng, width, scale=0.3)
    x64 = x.astype(F64)
    expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * (1.0 + w)
    assert_close(ops.rms_norm(x, w, eps), expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_with_zero_weight_gives_unit_rms_and_minus_one_gives_zero(rng):
    x = rand(rng, 4, 33, scale=7.0)
    y = ops.rms_norm(x, np.zeros(33, F32), 1e-6)  # the (1 + w) form: w = 0 is the identity scale
    np.testing.assert_allclose(np.sqrt((y.astype(F64) ** 2).mean(-1)), 1.0, rtol=1e-5)
    assert not ops.rms_norm(x, np.full(33, -1.0, F32), 1e-6).any()


def test_rms_norm_eps_is_added_inside_the_square_root():
    x = np.full((1, 4), 1e-3, F32)  # mean(x²) = 1e-6: eps is comparable and must matter
    y = ops.rms_norm(x, np.zeros(4, F32), 1e-6)
    np.testing.assert_allclose(y, 1e-3 / math.sqrt(1e-6 + 1e-6), rtol=1e-5)
    assert not ops.rms_norm(np.zeros((2, 3), F32), np.zeros(3, F32), 1e-6).any()  # 0 stays 0, no NaN


# ---- activations ----------------------------------------------------------------------------

def gelu_tanh_64(x: float) -> float:
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


GELU_POINTS = np.array([-30, -10, -3, -1, -0.5, -1e-3, 0, 1e-3, 0.5, 1, 3, 10, 30], F32)


@pytest.mark.parametrize("shape", [(13,), (3, 7), (2, 3, 65)])
def test_gelu_tanh_matches_tanh_formula(rng, shape):
    x = rand(rng, *shape, scale=4.0)
    x.flat[: min(x.size, GELU_POINTS.size)] = GELU_POINTS[: x.size]
    expected = np.vectorize(gelu_tanh_64)(x.astype(F64))
    assert_close(ops.gelu_tanh(x), expected, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_matches_torch_tanh_approximation(rng):
    torch = pytest.importorskip("torch")
    x = np.concatenate([GELU_POINTS, rand(rng, 1001, scale=5.0)])
    expected = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert_close(ops.gelu_tanh(x), expected.astype(F64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1,), (5, 9), (2, 3, 31)])
def test_geglu_is_gelu_tanh_of_gate_times_up(rng, shape):
    gate, up = rand(rng, *shape, scale=2.0), rand(rng, *shape)
    expected = np.vectorize(gelu_tanh_64)(gate.astype(F64)) * up
    assert_close(ops.geglu(gate, up), expected, rtol=1e-5, atol=1e-6)


# ---- softmax / softcap ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1,), (1, 1), (4, 7), (2, 3, 129)])
def test_softmax_matches_exp_over_sum(rng, shape):
    x = rand(rng, *shape, scale=5.0)
    e = np.exp(x.astype(F64))
    assert_close(ops.softmax(x), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_softmax_along_another_axis(rng):
    x = rand(rng, 5, 3)
    e = np.exp(x.astype(F64))
    assert_close(ops.softmax(x, axis=0), e / e.sum(0, keepdims=True), rtol=1e-5, atol=1e-7)


def test_softmax_of_huge_logits_stays_finite_and_sums_to_one():
    x = np.array([[1e4, -1e4, 0.0, 1e4 - 1.0],
                  [-1e4, -1e4 + 2.0, -1e4, -1e4],
                  [1e30, 1e30, -1e30, 0.0]], F32)
    p = ops.softmax(x)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    e = math.exp(-1.0)
    np.testing.assert_allclose(p[0], [1 / (1 + e), 0, 0, e / (1 + e)], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(p[2], [0.5, 0.5, 0, 0], atol=1e-30)


@pytest.mark.parametrize("value", [0.0, -7.5, 1e4])
@pytest.mark.parametrize("n", [1, 3, 257])
def test_softmax_of_equal_values_is_uniform(value, n):
    np.testing.assert_allclose(ops.softmax(np.full((2, n), value, F32)), 1.0 / n, rtol=1e-6)


@pytest.mark.parametrize("cap", [1.0, 30.0, 50.0])
@pytest.mark.parametrize("shape", [(7,), (3, 65)])
def test_softcap_is_cap_times_tanh_of_x_over_cap(rng, shape, cap):
    x = rand(rng, *shape, scale=80.0)
    assert_close(ops.softcap(x, cap), cap * np.tanh(x.astype(F64) / cap), rtol=1e-5, atol=1e-5)
    assert np.abs(ops.softcap(x, cap)).max() <= cap


def test_softcap_none_is_identity(rng):
    x = rand(rng, 4, 5, scale=100.0)
    np.testing.assert_array_equal(ops.softcap(x, None), x)


# ---- RoPE -----------------------------------------------------------------------------------

def rope_by_pairs(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate each pair (j, j + hd/2) of every head by angle pos · theta^(-2j/hd), in float64."""
    B, T, heads, hd = x.shape
    half = hd // 2
    out = np.empty(x.shape, F64)
    for b in range(B):
        for t in range(T):
            for j in range(half):
                angle = float(positions[b, t]) * theta ** (-2.0 * j / hd)
                c, s = math.cos(angle), math.sin(angle)
                for h in range(heads):
                    x1, x2 = float(x[b, t, h, j]), float(x[b, t, h, j + half])
                    out[b, t, h, j] = x1 * c - x2 * s
                    out[b, t, h, j + half] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize("B, T, heads, hd", [(1, 1, 1, 2), (2, 5, 3, 8), (1, 7, 2, 16), (3, 2, 1, 64)])
@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_rotates_each_half_pair_like_a_loop(rng, B, T, heads, hd, theta):
    x = rand(rng, B, T, heads, hd)
    positions = rng.integers(0, 300, size=(B, T))  # int64, as the cache hands them out
    cos, sin = ops.rope_cos_sin(positions, hd, theta)
    assert cos.shape == sin.shape == (B, T, hd)
    # float32 angles up to 300 rad carry ~2e-5 absolute error: the loop is float64
    assert_close(ops.rope(x, cos, sin), rope_by_pairs(x, positions, theta), rtol=1e-4, atol=1e-4)


def test_rope_at_position_zero_is_identity(rng):
    x = rand(rng, 2, 3, 4, 16)
    cos, sin = ops.rope_cos_sin(np.zeros((2, 3), np.int64), 16, 10000.0)
    np.testing.assert_array_equal(ops.rope(x, cos, sin), x)


def test_rope_preserves_the_norm_of_each_pair(rng):
    hd = 32
    x = rand(rng, 2, 6, 3, hd, scale=3.0)
    cos, sin = ops.rope_cos_sin(rng.integers(0, 5000, size=(2, 6)), hd, 10000.0)
    y = ops.rope(x, cos, sin).astype(F64)
    x64 = x.astype(F64)
    pair_norm = lambda a: np.hypot(a[..., : hd // 2], a[..., hd // 2:])  # noqa: E731
    np.testing.assert_allclose(pair_norm(y), pair_norm(x64), rtol=1e-5, atol=1e-5)


def test_rope_tables_are_float32_even_from_int64_positions():
    # the SPEC's trap: int64 positions × float32 inv_freq silently gives float64
    cos, sin = ops.rope_cos_sin(np.arange(10, dtype=np.int64).reshape(2, 5), 8, 10000.0)
    assert cos.dtype == sin.dtype == F32
    x = np.ones((2, 5, 1, 8), F32)
    assert ops.rope(x, cos, sin).dtype == F32


def test_rope_cos_sin_angles_match_inv_freq_formula():
    hd, theta = 8, 10000.0
    positions = np.array([[1, 2, 17]])
    cos, sin = ops.rope_cos_sin(positions, hd, theta)
    angles = positions[..., None] * theta ** (-np.arange(0, hd, 2) / hd)
    emb = np.concatenate([angles, angles], -1)  # cat(freqs, freqs)
    assert_close(cos, np.cos(emb), atol=1e-6)
    assert_close(sin, np.sin(emb), atol=1e-6)


# ---- attention ------------------------------------------------------------------------------

def attention_by_loop(q, k, v, mask, scale, cap=None):
    """Each batch row, query and head on its own, in float64; query head h reads kv head h // group."""
    B, T, heads, hd = q.shape
    group = heads // k.shape[2]
    out = np.zeros(q.shape, F64)
    for b in range(B):
        for t in range(T):
            keys = np.flatnonzero(mask[b, t])
            if keys.size == 0:  # no visible key: no defined output, left at zero
                continue
            for h in range(heads):
                kv = h // group
                s = np.array([q[b, t, h].astype(F64) @ k[b, j, kv].astype(F64) for j in keys]) * scale
                if cap is not None:
                    s = cap * np.tanh(s / cap)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, t, h] = sum(p_j * v[b, j, kv].astype(F64) for p_j, j in zip(p, keys))
    return out


@pytest.mark.parametrize("kv_heads", [1, 2, 3])
@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("B, T, S, hd", [(1, 1, 1, 4), (2, 3, 7, 5), (1, 6, 6, 16)])
@pytest.mark.parametrize("cap", [None, 5.0])
def test_attention_matches_per_head_loop_with_gqa_and_random_mask(rng, kv_heads, ratio, B, T, S, hd, cap):
    heads = kv_heads * ratio
    q, k, v = rand(rng, B, T, heads, hd, scale=2.0), rand(rng, B, S, kv_heads, hd), rand(rng, B, S, kv_heads, hd)
    mask = rng.random((B, T, S)) < 0.6
    mask[:, np.arange(T), rng.integers(0, S, size=T)] = True  # every query sees at least one key
    scale = hd ** -0.5
    # float32 matmuls + softmax vs float64: ggml's bound for attention is NMSE 5e-4, we hold 1e-5
    assert_close(ops.attention(q, k, v, mask, scale, cap), attention_by_loop(q, k, v, mask, scale, cap),
                 rtol=1e-5, atol=1e-5)


def test_attention_fully_masked_query_row_stays_finite(rng):
    q, k, v = rand(rng, 2, 3, 4, 8), rand(rng, 2, 5, 2, 8), rand(rng, 2, 5, 2, 8)
    mask = np.ones((2, 3, 5), bool)
    mask[0, 1] = False  # a padding query: nothing visible
    out = ops.attention(q, k, v, mask, 8 ** -0.5)
    assert np.isfinite(out).all()
    others = [(b, t) for b in range(2) for t in range(3) if (b, t) != (0, 1)]
    expected = attention_by_loop(q, k, v, mask, 8 ** -0.5)
    for b, t in others:  # the dead row does not disturb the live ones
        assert_close(out[b, t], expected[b, t], rtol=1e-5, atol=1e-5)


def test_attention_with_one_visible_key_returns_its_value(rng):
    q, k, v = rand(rng, 1, 2, 2, 4, scale=10.0), rand(rng, 1, 4, 1, 4), rand(rng, 1, 4, 1, 4)
    mask = np.zeros((1, 2, 4), bool)
    mask[0, 0, 2] = mask[0, 1, 0] = True
    out = ops.attention(q, k, v, mask, 0.5)
    np.testing.assert_allclose(out[0, 0], np.broadcast_to(v[0, 2], (2, 4)), rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], np.broadcast_to(v[0, 0], (2, 4)), rtol=1e-6)


# ---- embedding ------------------------------------------------------------------------------

@pytest.mark.parametrize("ids_shape", [(1, 1), (2, 7), (3, 1)])
@pytest.mark.parametrize("fmt", [Format.F32, Format.BF16])
def test_embedding_looks_up_rows(rng, ids_shape, fmt):
    table = rand(rng, 11, 5) if fmt is Format.F32 else rng.integers(0, 1 << 16, (11, 5)).astype(np.uint16)
    ids = rng.integers(0, 11, size=ids_shape)
    out = ops.embedding(Matrix(table, fmt), ids)
    assert out.dtype == F32 and out.shape == (*ids_shape, 5)
    for idx in np.ndindex(*ids_shape):
        row = table[ids[idx]]
        expected = row if fmt is Format.F32 else (row.astype(np.uint32) << 16).view(F32)  # bf16: the float's high half
        np.testing.assert_array_equal(out[idx].view(np.uint32), expected.view(np.uint32))


# ---- output dtypes --------------------------------------------------------------------------

def test_every_op_returns_float32_for_float32_inputs(rng):
    x, w, b = rand(rng, 2, 3, 8), rand(rng, 8), rand(rng, 8)
    cos, sin = ops.rope_cos_sin(np.arange(6).reshape(2, 3), 8, 10000.0)
    q, kv = rand(rng, 2, 3, 2, 8), rand(rng, 2, 3, 1, 8)
    outputs = {
        "linear": ops.linear(x, Matrix(rand(rng, 5, 8))),
        "linear+bias": ops.linear(x, Matrix(rand(rng, 5, 8)), rand(rng, 5)),
        "linear-bf16": ops.linear(x, Matrix(f32_to_bf16(rand(rng, 5, 8)), Format.BF16)),
        "layer_norm": ops.layer_norm(x, w, b, 1e-6),
        "rms_norm": ops.rms_norm(x, w, 1e-6),
        "gelu_tanh": ops.gelu_tanh(x),
        "geglu": ops.geglu(x, x),
        "softmax": ops.softmax(x),
        "softcap": ops.softcap(x, 30.0),
        "rope_cos": cos, "rope_sin": sin,
        "rope": ops.rope(q, cos, sin),
        "attention": ops.attention(q, kv, kv, np.ones((2, 3, 3), bool), 8 ** -0.5, 50.0),
        "embedding": ops.embedding(Matrix(rand(rng, 10, 4)), np.array([[1, 2]])),
        "embedding-bf16": ops.embedding(Matrix(f32_to_bf16(rand(rng, 10, 4)), Format.BF16), np.array([[1, 2]])),
    }
    assert {name: str(a.dtype) for name, a in outputs.items()} == {name: "float32" for name in outputs}


# ---- bf16 -----------------------------------------------------------------------------------

ALL_BF16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # every bit pattern: inf, nan, subnormals


def bf16_by_formula(bits: int) -> float:
    sign = -1.0 if bits >> 15 else 1.0
    exponent, mantissa = (bits >> 7) & 0xFF, bits & 0x7F
    if exponent == 0xFF:
        return sign * math.inf if mantissa == 0 else math.nan
    if exponent == 0:
        return sign * mantissa / 128.0 * 2.0 ** -126  # subnormal
    return sign * (1.0 + mantissa / 128.0) * 2.0 ** (exponent - 127)


def test_bf16_to_f32_is_the_high_half_of_the_float_bits():
    out = bf16_to_f32(ALL_BF16)
    assert out.dtype == F32 and out.shape == ALL_BF16.shape
    np.testing.assert_array_equal(out.view(np.uint32), ALL_BF16.astype(np.uint32) << 16)


def test_bf16_to_f32_matches_sign_exponent_mantissa_formula():
    with np.errstate(invalid="ignore"):  # casting signalling NaNs warns
        out = bf16_to_f32(ALL_BF16).astype(F64)
    expected = np.array([bf16_by_formula(int(b)) for b in ALL_BF16])
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    ok = ~np.isnan(expected)
    np.testing.assert_array_equal(out[ok], expected[ok])
    np.testing.assert_array_equal(np.signbit(out[ok]), np.signbit(expected[ok]))  # -0 stays -0


def test_bf16_to_f32_matches_torch_bit_for_bit():
    torch = pytest.importorskip("torch")
    theirs = torch.from_numpy(ALL_BF16.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16_to_f32(ALL_BF16).view(np.uint32), theirs.view(np.uint32))


def test_f32_to_bf16_rounds_to_nearest_even_like_torch_bit_for_bit():
    """weight_dtype="bfloat16" rounds f32 checkpoints with formats.f32_to_bf16: it must give torch's bits.
    Every bf16 value, each with the low 16 bits below, at and above the halfway point — exact ties
    with an even and an odd high half (round to even: down and up), the largest finite floats
    (round to inf), subnormals, infinities — and NaNs (any NaN bits; only NaN-ness is compared)."""
    torch = pytest.importorskip("torch")
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    x = ((ALL_BF16.astype(np.uint32) << 16)[:, None] | low[None, :]).ravel().view(F32)
    ours = f32_to_bf16(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_to_f32(ours[nan])).all()


def test_bf16_to_f32_works_on_non_contiguous_views():
    bits = ALL_BF16[::7].reshape(-1, 1)[:100]  # a non-contiguous view
    np.testing.assert_array_equal(bf16_to_f32(bits).view(np.uint32), bits.astype(np.uint32) << 16)


# ---- prefix-LM mask -------------------------------------------------------------------------

def mask_by_formula(valid, prefix, start, T, window=None):
    """The SPEC's rule, one (query, key) at a time."""
    B, S = valid.shape[0], start + T
    out = np.zeros((B, T, S), bool)
    for b in range(B):
        for t in range(T):
            i = start + t
            for j in range(S):
                causal = j <= i and (window is None or j > i - window)
                out[b, t, j] = bool(valid[b, j]) and (causal or bool(prefix[b, i] and prefix[b, j]))
    return out


def test_prefix_tokens_attend_forward_and_suffix_tokens_are_causal():
    valid = np.ones((1, 6), bool)
    prefix = np.array([[1, 1, 1, 1, 0, 0]], bool)
    expected = np.array([[1, 1, 1, 1, 0, 0],  # prefix rows see the whole prefix, also ahead
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 0],  # suffix rows: causal
                         [1, 1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(prefix_lm_mask(valid, prefix, 0, 6)[0], expected)


def test_padding_keys_are_never_visible():
    valid = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)  # row 0 left-padded
    prefix = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], bool)  # padding flagged prefix on purpose
    for window in (None, 2):
        mask = prefix_lm_mask(valid, prefix, 0, 6, window)
        assert not mask[0, :, :2].any()
        np.testing.assert_array_equal(mask, mask_by_formula(valid, prefix, 0, 6, window))


def test_sliding_window_limits_only_the_causal_part():
    valid = np.ones((1, 7), bool)
    prefix = np.array([[1, 1, 1, 1, 0, 0, 0]], bool)
    mask = prefix_lm_mask(valid, prefix, 0, 7, sliding_window=2)[0]
    assert mask[:4, :4].all()  # the prefix sees itself whole, even 3 positions apart
    np.testing.assert_array_equal(mask[4], [0, 0, 0, 1, 1, 0, 0])  # suffix: only the last 2 positions
    np.testing.assert_array_equal(mask[6], [0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(mask, mask_by_formula(valid, prefix, 0, 7, 2)[0])


def test_decode_through_cache_sees_everything_cached_but_padding():
    cfg = TextConfig(num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=2)
    cache = KVCache(cfg, batch_size=2, max_len=8)
    valid = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    prefix = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
    cache.reserve(valid, prefix)
    cache.commit(5)
    start = cache.length
    positions = cache.reserve(np.ones((2, 1), bool), np.zeros((2, 1), bool))  # one decoded suffix token
    np.testing.assert_array_equal(positions, [[5], [6]])  # 1-based, padding not counted
    mask = prefix_lm_mask(cache.key_valid, cache.key_prefix, start, 1)
    np.testing.assert_array_equal(mask[:, 0], [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    windowed = prefix_lm_mask(cache.key_valid, cache.key_prefix, start, 1, sliding_window=3)
    np.testing.assert_array_equal(windowed[:, 0], [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]])


@pytest.mark.parametrize("start, T", [(0, 9), (4, 5), (8, 1)])
@pytest.mark.parametrize("window", [None, 1, 3, 100])
def test_prefix_lm_mask_matches_rule_on_random_layouts(rng, start, T, window):
    S = start + T
    valid = rng.random((3, S)) < 0.8
    n_prefix = rng.integers(0, S + 1, size=3)
    prefix = np.arange(S)[None] < n_prefix[:, None]
    mask = prefix_lm_mask(valid, prefix, start, T, window)
    assert mask.shape == (3, T, S) and mask.dtype == bool
    np.testing.assert_array_equal(mask, mask_by_formula(valid, prefix, start, T, window))


# ---- sampling -------------------------------------------------------------------------------

LOGITS = np.array([[0.5, 2.0, -1.0, 1.5, 0.0, -3.0],
                   [3.0, -2.0, 0.1, 0.2, 2.9, 1.0]], F32)


def test_temperature_zero_is_argmax(rng):
    logits = rand(rng, 5, 37, scale=3.0)
    np.testing.assert_array_equal(pick_next(logits, rng, 0.0), logits.argmax(-1))
    assert pick_next(logits, rng, 0.0).dtype == np.int64


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 100.0])
def test_top_k_one_is_argmax_at_any_temperature(rng, temperature):
    for _ in range(20):
        np.testing.assert_array_equal(pick_next(LOGITS, rng, temperature, top_k=1), [1, 0])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_tiny_top_p_is_argmax(rng, temperature):
    for _ in range(20):
        np.testing.assert_array_equal(pick_next(LOGITS, rng, temperature, top_p=1e-6), [1, 0])


def test_same_seed_gives_same_samples():
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(F32)
    draw = lambda seed: [pick_next(logits, np.random.default_rng(seed), 1.3, top_k=20, top_p=0.9)  # noqa: E731
                         for _ in range(10)]
    a, b = draw(7), draw(7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any((x != y).any() for x, y in zip(a, draw(8)))


def test_samples_at_temperature_one_follow_softmax(rng):
    n = 20000
    row = LOGITS[:1]
    ids = pick_next(np.repeat(row, n, axis=0), rng, 1.0)
    p = np.exp(row[0].astype(F64)) / np.exp(row[0].astype(F64)).sum()
    freq = np.bincount(ids, minlength=row.shape[1]) / n
    stderr = np.sqrt(p * (1 - p) / n)
    assert (np.abs(freq - p) < 5 * stderr + 1e-12).all(), (freq, p)


def test_top_k_and_top_p_keep_only_the_most_likely_tokens(rng):
    n = 4000
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * n, F64))
    assert set(pick_next(logits, rng, 1.0, top_k=2)) == {0, 1}
    assert set(pick_next(logits, rng, 1.0, top_p=0.75)) == {0, 1}  # 0.5 + 0.3 reaches p: stop there
    assert set(pick_next(logits, rng, 1.0, top_p=0.85)) == {0, 1, 2}
    assert set(pick_next(logits, rng, 1.0, top_p=0.4)) == {0}  # the top token always stays


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=1.0, top_k=0),
                                    dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_p=1.5),
                                    dict(temperature=1.0, top_p=-0.2)])
def test_invalid_sampling_arguments_raise_value_error(rng, kwargs):
    with pytest.raises(ValueError):
        pick_next(LOGITS, rng, **kwargs)
