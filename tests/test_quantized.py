"""MLX's affine quantization (mlx-community checkpoints): the format in NumPy, its loading, and
`refpg quantize`, each held to MLX itself.

With mlx + mlx-vlm installed (`pip install "refpg[conform]"`; CI sets REFPG_REQUIRE_MLX=1, which turns
their skip into a failure): refpg.formats dequantizes and quantizes bit for bit as mlx.core does, for
every bit width, group size and scale dtype; a checkpoint written by mlx-vlm's convert loads and
gives the logits of mlx-vlm's own dequantization of it, exactly; `refpg quantize` writes the bytes
mlx-vlm's convert writes, and mlx-vlm loads them. Without MLX: the properties of the format, the
loader's and the CLI's errors.
"""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, simd_paths_here

from refpg import PaliGemma, backend
from refpg.conform.cases import tiny_config
from refpg.conform.checkpoint import write_checkpoint
from refpg.errors import BackendError, CheckpointError, ConfigError
from refpg.formats import (AFFINE_BITS, AFFINE_GROUP_SIZES, Format, Matrix, pack_codes, quantize, round_to, to_float32,
                           unpack_codes)
from refpg.ops import embedding
from refpg.safetensors_io import SafetensorsFile, write_safetensors

F32 = np.float32
SCALE_FORMATS = (Format.F32, Format.BF16, Format.F16)
MLX_DTYPE = {Format.F32: "float32", Format.BF16: "bfloat16", Format.F16: "float16"}


def require(module: str):
    """The module; where it cannot be imported a skip — or a failure when REFPG_REQUIRE_MLX is set."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("REFPG_REQUIRE_MLX"):
            pytest.fail(f"REFPG_REQUIRE_MLX is set but {module} does not import: {e}")
        pytest.skip(f"{module} is not installed (pip install \"refpg[conform]\"): {e}")


def weights(rng, rows=12, cols=256) -> np.ndarray:
    """Rows of very different magnitudes, and groups that are all zero, constant, or one-sided."""
    w = (rng.standard_normal((rows, cols)) * rng.choice([1e-9, 1e-3, 1.0, 60.0], (rows, 1))).astype(F32)
    w[0, :32] = 0
    w[1, :32] = 3.0
    w[2, :32] = np.abs(w[2, :32])
    w[3, :32] = -np.abs(w[3, :32])
    return w


def tiny(tmp_path, name="tiny", dtype="BF16", **text) -> str:
    """A tiny checkpoint whose text matrices split into groups of 32 and 64 (intermediate 128)."""
    return write_checkpoint(str(tmp_path / name), tiny_config(text={"intermediate_size": 128, **text}), seed=3, dtype=dtype)


def inputs(model: PaliGemma, seed=0):
    rng = np.random.default_rng(seed)
    n = model.config.num_image_tokens
    ids = np.concatenate([np.full((1, n), model.config.image_token_index), [[2]], rng.integers(6, 1600, (1, 7))], 1)
    types = np.zeros_like(ids)
    types[:, -3:] = 1  # a suffix: prefix-LM attention
    return ids, rng.standard_normal((1, 3, 32, 32)).astype(F32), types


def logits(model: PaliGemma, seed=0) -> np.ndarray:
    ids, pixels, types = inputs(model, seed)
    return model(ids, pixels, token_type_ids=types)


# ---- the format, without MLX ------------------------------------------------------------------

@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_codes_pack_into_a_little_endian_bit_stream_and_back(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (5, 128)).astype(np.uint32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint32 and packed.shape == (5, 128 * bits // 32)
    np.testing.assert_array_equal(unpack_codes(packed, bits), codes)
    # element i occupies bits [i·bits, (i+1)·bits) of the row's little-endian bit stream
    stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    i = 37
    assert int("".join(map(str, stream[2, i * bits:(i + 1) * bits][::-1])), 2) == codes[2, i]


@pytest.mark.parametrize("fmt", SCALE_FORMATS)
@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 64), (5, 128), (6, 32), (8, 128)])
def test_dequantized_values_lie_within_half_a_step_of_the_originals(bits, group_size, fmt):
    """Away from the ends of the code range: MLX moves the scale so that the group's edge (its min or
    max, whichever is larger in magnitude) is exact, which can push values at the other end past
    the last code, where they are clipped (exactness is tested against MLX below)."""
    x = round_to(weights(np.random.default_rng(bits)), fmt)
    m = quantize(x, bits, group_size, fmt)
    assert m.shape == x.shape and m.scales.format is fmt and m.scales.shape == (12, 256 // group_size)
    step = np.repeat(np.abs(to_float32(m.scales)), group_size, axis=1)
    err = np.abs(to_float32(m) - x)
    # half a step, plus the roundings of the scale, the bias and q·s + b to the scales' dtype
    slack = {Format.F32: 1e-5, Format.BF16: 2 ** -6, Format.F16: 2 ** -9}[fmt] * (np.abs(x) + step * (1 << bits))
    codes = unpack_codes(m.data, bits)
    inner = (codes > 0) & (codes < (1 << bits) - 1)
    assert inner.mean() > 0.2  # 2 bits: two inner codes of four
    assert (err <= step / 2 + slack)[inner].all()


def test_quantizing_in_row_chunks_gives_the_same_matrix(monkeypatch):
    """quantize works on a few rows at a time (a 257 216-row embedding would otherwise need several
    full-size temporaries); groups lie within rows, so the chunks change nothing."""
    import refpg.formats as formats

    x = weights(np.random.default_rng(5), rows=30)
    whole = quantize(x, 3, 32, Format.BF16)
    monkeypatch.setattr(formats, "QUANTIZE_CHUNK", 7 * 256)  # 7 rows per pass: 5 passes, the last short
    parts = quantize(x, 3, 32, Format.BF16)
    for a, b in ((whole.data, parts.data), (whole.scales.data, parts.scales.data), (whole.biases.data, parts.biases.data)):
        np.testing.assert_array_equal(a, b)


def test_an_affine_matrix_reads_rows_and_says_its_bytes():
    x = weights(np.random.default_rng(0))
    m = quantize(x, 4, 64, Format.BF16)
    assert m.nbytes == 12 * 256 // 2 + 2 * 12 * 4 * 2  # codes + bf16 scales and biases
    ids = np.array([[3, 0], [11, 3]])
    np.testing.assert_array_equal(embedding(m, ids), to_float32(m)[ids])


@pytest.mark.parametrize("bad, message", [
    (dict(bits=7), "bits"), (dict(group_size=16), "group sizes"),
    (dict(scales_shape=(12, 3)), "scales"), (dict(scale_format=Format.AFFINE), "scales"),
])
def test_a_malformed_affine_matrix_is_refused(bad, message):
    m = quantize(weights(np.random.default_rng(0)), 4, 64)
    scales = m.scales
    if "scales_shape" in bad:
        scales = Matrix(np.ones(bad["scales_shape"], F32))
    if "scale_format" in bad:
        scales = m
    with pytest.raises((ValueError, TypeError), match=message):
        Matrix(m.data, Format.AFFINE, bad.get("bits", 4), bad.get("group_size", 64), scales, m.biases)


# ---- config.json ---------------------------------------------------------------------------

@pytest.mark.parametrize("quantization, message", [
    ({"bits": 4, "group_size": 64, "mode": "mxfp4"}, "affine"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method"),
    ({"bits": 7, "group_size": 64}, "bits = 7"),
    ({"bits": 4, "group_size": 48}, "group_size = 48"),
    ({"bits": 4}, "group_size is missing"),
    ({"bits": 4, "group_size": 64, "language_model.model.layers.0.mlp.down_proj": 8}, "down_proj"),
])
def test_a_quantization_refpg_cannot_read_is_a_config_error(quantization, message):
    from refpg.config import config_from_dict

    with pytest.raises(ConfigError, match=message):
        config_from_dict({**tiny_config(), "quantization": quantization})


def test_per_module_quantization_overrides_are_read():
    from refpg.config import config_from_dict

    q = config_from_dict({**tiny_config(), "quantization": {
        "bits": 4, "group_size": 64, "language_model.model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 32},
        "language_model.model.embed_tokens": False}}).quantization
    assert q.of("language_model.model.layers.1.mlp.down_proj") == (4, 64)
    assert q.of("language_model.model.layers.0.mlp.down_proj") == (8, 32)
    assert q.of("language_model.model.embed_tokens") is None


# ---- refpg quantize, and loading what it writes ------------------------------------------------

def test_refpg_quantize_writes_a_checkpoint_that_loads_and_stays_close(tmp_path):
    src = tiny(tmp_path)
    result = run_cli("quantize", "--model", src, "--bits", "8", "--group-size", "32", "--out", str(tmp_path / "q8"))
    assert result.returncode == 0, result.stderr
    assert "22 matrices as 8-bit codes in groups of 32" in result.stderr
    with open(tmp_path / "q8" / "config.json") as f:
        assert json.load(f)["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert os.path.isfile(tmp_path / "q8" / "tokenizer.model")
    q8 = PaliGemma.from_pretrained(str(tmp_path / "q8"), backend="numpy")
    w = q8.weights.text
    assert w.embed_tokens.format is Format.AFFINE and w.lm_head is w.embed_tokens
    assert w.layers[0].down_proj.weight.format is Format.AFFINE and w.layers[0].down_proj.weight.bits == 8
    assert q8.weights.vision.layers[0].fc1.weight.format is not Format.AFFINE  # the vision tower stays
    original = PaliGemma.from_pretrained(src, backend="numpy")
    np.testing.assert_array_equal(q8.weights.vision.patch_embedding.weight.data,
                                  original.weights.vision.patch_embedding.weight.data)  # written channel-last, read back
    ref = logits(original)
    err = np.abs(logits(q8) - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05, err  # 8 bits in groups of 32: about 1 % here


@pytest.mark.parametrize("bits", [4, 8, 3, 6])
def test_a_quantized_checkpoint_runs_on_cpp_like_the_reference(tmp_path, bits):
    """cpp reads the packed codes itself (csrc/cpu/affine.h): prefill and decode through the cache
    agree with the NumPy reference's dequantized model, and greedy decoding picks the same tokens."""
    if "cpp" in backend.UNAVAILABLE:
        pytest.skip(backend.UNAVAILABLE["cpp"])
    src = tiny(tmp_path)
    assert run_cli("quantize", "--model", src, "--bits", str(bits), "--group-size", "32", "--out",
                   str(tmp_path / "q")).returncode == 0
    native = PaliGemma.from_pretrained(str(tmp_path / "q"))  # auto
    assert set(native.selection.backends.values()) == {"cpp"}
    reference = PaliGemma.from_pretrained(str(tmp_path / "q"), backend="numpy")
    ref = logits(reference)
    assert np.abs(logits(native) - ref).max() / np.abs(ref).max() < 1e-3
    ids, pixels, types = inputs(native)
    batch = {"input_ids": ids[:, :-3], "pixel_values": pixels, "token_type_ids": types[:, :-3]}
    np.testing.assert_array_equal(native.generate(batch, max_new_tokens=5), reference.generate(batch, max_new_tokens=5))


def x_in_fixed_point(x: np.ndarray, group_size: int) -> np.ndarray:
    """x as csrc/cpu/affine.cpp's VNNI GEMV reads it, written from its comment: per group a power of
    two t with max|x| / t <= 32639 (the largest whose pieces fit two signed bytes), as large a value
    range as that allows, each x rounded to the nearest multiple of t (ties to even)."""
    groups = x.reshape(*x.shape[:-1], -1, group_size).astype(np.float64)
    top = np.abs(groups).max(-1, keepdims=True)
    e = np.frexp(top)[1]                                        # top = f · 2^e, f in [0.5, 1)
    t = np.ldexp(1.0, np.maximum(np.where(top * 2.0 ** (15 - e) <= 32639, e - 15, e - 14), -126))
    return (np.rint(groups / t) * t).reshape(x.shape)


@pytest.mark.parametrize("path, bits", [("avx2", 4), ("avx512", 4), ("avx512", 8), ("avx512", 3), ("avx512", 6)])
@pytest.mark.parametrize("group_size", AFFINE_GROUP_SIZES)
def test_the_integer_gemv_is_the_dot_product_with_x_in_16_bit_fixed_point(path, bits, group_size):
    """Decode on 4-bit codes with AVX2, and on codes of every width with AVX-512 VNNI (3- and 6-bit
    ones unpacked to bytes first), multiplies the
    codes by x rounded to 16-bit fixed point per group (x_in_fixed_point), in integers: the result is
    Σ w·x̃ with w = s·q + b unrounded, to float32 accumulation (<= 1e-6 of Σ|w·x̃|); x̃ is within 2^-15
    of the group's largest |x| of x. K = 352 ends in a partial 64-byte chunk of codes, N = 37 in a
    partial tile of rows; one x row spans 40 octaves."""
    from refpg import _C

    from conftest import simd_path

    if simd_paths_here()[path] is not None:
        pytest.skip(simd_paths_here()[path])
    if path == "avx512" and not _C.cpu_features()["avx512vnni"]:
        pytest.skip("this CPU has AVX-512 without VNNI: its avx512 path runs the AVX2 loops")
    rng = np.random.default_rng(bits * 1000 + group_size)
    K = 352 if group_size == 32 else 384
    w = quantize(rng.standard_normal((37, K)).astype(np.float32) / 20, bits, group_size, Format.F32)
    x = rng.standard_normal((3, K)).astype(np.float32)
    x[2] *= np.exp2(rng.uniform(-20, 20, K)).astype(np.float32)
    x_fixed = x_in_fixed_point(x, group_size)
    assert np.all(np.abs(x_fixed - x).reshape(3, -1, group_size).max(-1)
                  <= np.abs(x).reshape(3, -1, group_size).max(-1) * 2.0 ** -15)
    exact = x_fixed @ to_float32(w).astype(np.float64).T       # F32 scales: w = s·q + b in float32, no rounding
    with simd_path(path):
        y = backend.OPS["linear"]["cpp"](x, w)
    scale = np.abs(x_fixed) @ np.abs(to_float32(w).astype(np.float64)).T
    assert np.all(np.abs(y - exact) <= 1e-6 * scale)
    plain = x.astype(np.float64) @ to_float32(w).astype(np.float64).T
    assert not np.all(np.abs(plain - exact) <= 1e-6 * scale)  # the bound tells x̃ from x


@pytest.mark.parametrize("path", [p for p, why in simd_paths_here().items() if why is None])
def test_gemv_rows_of_x_with_inf_or_nan_stay_non_finite(path):
    """An Inf or a NaN in a row of x makes its outputs Inf or NaN on every path (the VNNI GEMV hands
    such rows to the float loop: fixed point has no Inf), and leaves the other rows as they were."""
    from conftest import simd_path

    rng = np.random.default_rng(7)
    w = quantize(rng.standard_normal((20, 256)).astype(np.float32), 4, 64, Format.BF16)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[1, 100], x[2, 3] = np.inf, np.nan
    with simd_path(path):
        y = backend.OPS["linear"]["cpp"](x, w)
        alone = backend.OPS["linear"]["cpp"](x[:1], w)
    assert not np.isfinite(y[1:]).any()
    np.testing.assert_array_equal(y[0], alone[0])


def test_refpg_quantize_keeps_a_channel_last_patch_embedding_as_it_is(tmp_path):
    """A source already in MLX's layout (an unquantized mlx-vlm conversion) is not transposed twice."""
    src = tiny(tmp_path)
    run_cli("quantize", "--model", src, "--bits", "8", "--group-size", "32", "--out", str(tmp_path / "a"))
    # the same weights with the patch embedding stored channel-last, and no quantization
    rewrite(src, lambda t: t.update({"vision_tower.vision_model.embeddings.patch_embedding.weight": (
        "BF16", np.ascontiguousarray(t["vision_tower.vision_model.embeddings.patch_embedding.weight"][1].transpose(0, 2, 3, 1)))}))
    run_cli("quantize", "--model", src, "--bits", "8", "--group-size", "32", "--out", str(tmp_path / "b"))
    a, b = (SafetensorsFile(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    name = "vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert a.shape(name) == b.shape(name) == (32, 8, 8, 3) and a.raw(name).tobytes() == b.raw(name).tobytes()


def test_a_backend_without_kernels_for_the_format_is_refused_by_name(tmp_path, monkeypatch):
    from refpg.backends.base import OP_NAMES, Backend

    class Plain(Backend):  # every op, float32 and bf16 weights only
        name = "plain"
        ops = {op: backend.OPS[op]["numpy"] for op in OP_NAMES}

    monkeypatch.setitem(backend.BACKENDS, "plain", Plain())
    for op in OP_NAMES:
        monkeypatch.setitem(backend.OPS[op], "plain", Plain.ops[op])
    src = tiny(tmp_path)
    run_cli("quantize", "--model", src, "--bits", "4", "--out", str(tmp_path / "q4"))
    assert PaliGemma.from_pretrained(src, backend="plain").selection.backends["linear"] == "plain"
    with pytest.raises(BackendError, match="'plain' cannot read mlx-affine weights in linear"):
        PaliGemma.from_pretrained(str(tmp_path / "q4"), backend="plain")


def test_a_quantized_checkpoint_runs_on_the_cuda_path_with_its_weights_uploaded_once(tmp_path, fake_gpu):
    """cuda's data path (tests/fake_cuda.py computes each op with refpg.ops): codes, scales and biases
    go up once at load, tied embedding and LM head shared, and the logits are the reference's."""
    src = tiny(tmp_path)
    run_cli("quantize", "--model", src, "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "q4"))
    model = PaliGemma.from_pretrained(str(tmp_path / "q4"), backend="cuda")
    embed = model.weights.text.embed_tokens
    assert embed.format is Format.AFFINE and model.weights.text.lm_head is embed
    assert all(type(a).__name__ == "DeviceArray" for a in (embed.data, embed.scales.data, embed.biases.data))
    reference = PaliGemma.from_pretrained(str(tmp_path / "q4"), backend="numpy")
    np.testing.assert_allclose(logits(model), logits(reference), rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, needle", [
    (("--bits", "7"), "--bits 7"), (("--bits", "4", "--group-size", "48"), "--group-size 48"),
])
def test_refpg_quantize_refuses_bad_flags_on_one_line(tmp_path, args, needle):
    src = tiny(tmp_path)
    assert_one_line_error(run_cli("quantize", "--model", src, *args, "--out", str(tmp_path / "out")), needle)
    assert not os.path.exists(tmp_path / "out")


def test_refpg_quantize_refuses_a_quantized_model_and_a_used_output(tmp_path):
    src = tiny(tmp_path)
    assert run_cli("quantize", "--model", src, "--bits", "4", "--out", str(tmp_path / "q4")).returncode == 0
    assert_one_line_error(run_cli("quantize", "--model", str(tmp_path / "q4"), "--bits", "4", "--out",
                                  str(tmp_path / "again")), "already quantized")
    assert_one_line_error(run_cli("quantize", "--model", src, "--bits", "4", "--out", str(tmp_path / "q4")),
                          "not an empty directory")


def rewrite(model_dir: str, change) -> None:
    """Rewrite model.safetensors with change(tensors: {name: (dtype, array)})."""
    path = os.path.join(model_dir, "model.safetensors")
    f = SafetensorsFile(path)
    tensors = {n: (f.dtype(n), np.array(f.raw(n))) for n in f.keys()}
    change(tensors)
    write_safetensors(path, tensors)


QPROJ = "language_model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop(QPROJ + ".biases"), "lacks language_model.model.layers.0.self_attn.q_proj.biases"),
    (lambda t: t.update({QPROJ + ".scales": ("F32", t[QPROJ + ".scales"][1].astype(F32))}), "its scales|MLX stores both"),
    (lambda t: t.update({QPROJ + ".weight": ("U32", t[QPROJ + ".weight"][1][:, :4].copy())}), "need U32 \\[64, 8\\]"),
    (lambda t: t.update({QPROJ + ".scales": ("BF16", np.full_like(t[QPROJ + ".scales"][1], 0x7FC0))}), "NaN"),
    (lambda t: t.update({"language_model.model.norm.scales": ("BF16", np.zeros((64, 1), np.uint16))}),
     "no matrix 'language_model.model.norm'"),
])
def test_a_malformed_quantized_checkpoint_is_an_error_naming_the_tensor(tmp_path, change, message):
    src = tiny(tmp_path)
    run_cli("quantize", "--model", src, "--bits", "4", "--out", str(tmp_path / "q4"))
    rewrite(str(tmp_path / "q4"), change)
    with pytest.raises(CheckpointError, match=message):
        PaliGemma.from_pretrained(str(tmp_path / "q4"), backend="numpy")


def test_scales_without_a_quantization_in_config_json_are_an_error(tmp_path):
    src = tiny(tmp_path)
    run_cli("quantize", "--model", src, "--bits", "4", "--out", str(tmp_path / "q4"))
    with open(tmp_path / "q4" / "config.json") as f:
        config = json.load(f)
    del config["quantization"], config["quantization_config"]
    with open(tmp_path / "q4" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match='config.json has no "quantization"'):
        PaliGemma.from_pretrained(str(tmp_path / "q4"), backend="numpy")


# ---- held to MLX ------------------------------------------------------------------------------

def mlx_matrix(mx, q, s, b, bits, group_size, fmt) -> Matrix:
    """MLX's (codes, scales, biases) as a refpg Matrix (bf16 as its bits)."""
    def part(a):
        if fmt is Format.BF16:
            return Matrix(np.array(a.view(mx.uint16)), fmt)
        return Matrix(np.array(a), fmt)
    return Matrix(np.array(q), Format.AFFINE, bits, group_size, part(s), part(b))


@pytest.mark.parametrize("fmt", SCALE_FORMATS, ids=lambda f: f.value)
def test_dequantization_equals_mlx_bit_for_bit(fmt):
    mx = require("mlx.core")
    rng = np.random.default_rng(1)
    for bits in AFFINE_BITS:
        for group_size in AFFINE_GROUP_SIZES:
            w = mx.array(weights(rng)).astype(getattr(mx, MLX_DTYPE[fmt]))
            q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
            theirs = np.array(mx.dequantize(q, s, b, group_size=group_size, bits=bits).astype(mx.float32))
            ours = to_float32(mlx_matrix(mx, q, s, b, bits, group_size, fmt))
            np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32), err_msg=f"{bits} bits, {group_size}")


@pytest.mark.parametrize("fmt", SCALE_FORMATS, ids=lambda f: f.value)
def test_quantization_equals_mlx_bit_for_bit(fmt):
    mx = require("mlx.core")
    rng = np.random.default_rng(2)
    for bits in AFFINE_BITS:
        for group_size in AFFINE_GROUP_SIZES:
            w = mx.array(weights(rng)).astype(getattr(mx, MLX_DTYPE[fmt]))
            theirs = mlx_matrix(mx, *mx.quantize(w, group_size=group_size, bits=bits), bits, group_size, fmt)
            ours = quantize(np.array(w.astype(mx.float32)), bits, group_size, fmt)
            for part in ("data", "scales", "biases"):
                a, b = getattr(ours, part), getattr(theirs, part)
                a, b = (a.data, b.data) if part != "data" else (a, b)
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{bits} bits, groups of {group_size}: {part}"


@pytest.fixture(scope="module")
def mlx_converted(tmp_path_factory):
    """A tiny BF16 checkpoint, quantized by mlx-vlm's convert to 4 bits (groups of 64) and 8 bits
    (groups of 32), and the 4-bit one dequantized again by mlx-vlm."""
    require("mlx.core")
    convert = require("mlx_vlm.convert").convert
    root = tmp_path_factory.mktemp("mlx")
    src = tiny(root)
    out = {"src": src}
    for bits, group_size in ((4, 64), (8, 32)):
        out[bits] = str(root / f"mlx-q{bits}")
        convert(src, out[bits], quantize=True, q_group_size=group_size, q_bits=bits)
    out["deq"] = str(root / "mlx-deq")
    convert(out[4], out["deq"], dequantize=True)
    return out


def test_a_checkpoint_mlx_vlm_quantized_gives_the_logits_of_its_dequantization(mlx_converted):
    """mlx-vlm's own dequantization written out as a plain checkpoint is the model a quantized one
    stands for: refpg's logits on the two are the same floats."""
    quantized = PaliGemma.from_pretrained(mlx_converted[4], backend="numpy")
    assert quantized.weights.text.layers[0].q_proj.weight.format is Format.AFFINE
    dequantized = PaliGemma.from_pretrained(mlx_converted["deq"], backend="numpy")
    assert dequantized.weights.text.layers[0].q_proj.weight.format is not Format.AFFINE
    for seed in (0, 1):
        np.testing.assert_array_equal(logits(quantized, seed), logits(dequantized, seed))


@pytest.mark.parametrize("bits", [4, 8])
def test_refpg_quantize_writes_the_bytes_mlx_vlm_convert_writes(mlx_converted, tmp_path, bits):
    group_size = {4: 64, 8: 32}[bits]
    ours = str(tmp_path / "ours")
    result = run_cli("quantize", "--model", mlx_converted["src"], "--bits", str(bits), "--group-size", str(group_size),
                     "--out", ours)
    assert result.returncode == 0, result.stderr
    a = SafetensorsFile(os.path.join(ours, "model.safetensors"))
    b = SafetensorsFile(os.path.join(mlx_converted[bits], "model.safetensors"))
    assert sorted(a.keys()) == sorted(b.keys())
    for name in b.keys():
        assert (a.dtype(name), a.shape(name)) == (b.dtype(name), b.shape(name)), name
        assert a.raw(name).tobytes() == b.raw(name).tobytes(), name
    for path in (ours, mlx_converted[bits]):
        with open(os.path.join(path, "config.json")) as f:
            assert json.load(f)["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}


def test_mlx_vlm_loads_what_refpg_quantize_writes(tmp_path):
    require("mlx.core")
    utils = require("mlx_vlm.utils")
    from pathlib import Path

    src = tiny(tmp_path, dtype="F32")
    assert run_cli("quantize", "--model", src, "--bits", "4", "--out", str(tmp_path / "q4")).returncode == 0
    model = utils.load_model(Path(tmp_path / "q4"))
    assert type(model.language_model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    assert type(model.language_model.model.embed_tokens).__name__ == "QuantizedEmbedding"
