"""Every op × every available backend against the NumPy reference (ggml's test-backend-ops).

One table of cases; each case builds inputs, runs the op on the backend and on NumPy, and compares
with NMSE = Σ(a−b)²/Σb² against the op's bound in refpg.backend.TOLERANCE. NaN/Inf mismatches
fail before the error is measured. A backend that is not built here, or lacks an op, is skipped
with the reason.
"""

from __future__ import annotations

import contextlib
import re
import zlib

import numpy as np
import pytest
from conftest import require_cuda_or_skip, run_python, simd_path, simd_paths_here

from refpg import backend
from refpg.backends.cuda import DeviceArray
from refpg.formats import (AFFINE_BITS, AFFINE_GROUP_SIZES, Format, Matrix, bf16_to_f32, encode, f32_to_bf16,
                           quantize)
from refpg.gemma import prefix_lm_mask
from refpg.ops import rope_cos_sin

F32 = np.float32
rng = np.random.default_rng(1234)  # reseeded per op-table case (case_rng)


def case_rng(op: str, case: str) -> np.random.Generator:
    """A case's own generator: its inputs do not change when cases are added, reordered or deselected."""
    return np.random.default_rng(zlib.crc32(f"{op}-{case}".encode()))


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


# ---- cases: (op, id, builder returning the op's arguments) -------------------------------------

def linear_case(M, K, N, bias=True, bf16=False, batch=None):
    def build():
        x = randn(*(batch or ()), M, K)
        w = randn(N, K, scale=K ** -0.5)
        return (x, encode(w, Format.BF16 if bf16 else Format.F32), randn(N) if bias else None)
    return build


def norm_case(op, shape, x_scale=3.0, offset=0.5, eps=1e-6):
    """x_scale 1e-4, offset 0: mean(x²) and the variance are ~1e-8, so eps (1e-6) dominates them
    and an eps added in the wrong place shows; with the defaults it is negligible."""
    def build():
        x = randn(*shape, scale=x_scale) + F32(offset)
        D = shape[-1]
        if op == "rms_norm":
            return (x, randn(D, scale=0.3), eps)
        return (x, 1 + randn(D, scale=0.3), randn(D, scale=0.1), eps)
    return build


def attention_case(B, T, S, H, KV, hd, mask="prefix", softcap=None, max_len=None, score_scale=None):
    """score_scale: q and k times it, so scores reach ~score_scale² (a softmax without the max
    subtracted overflows exp beyond 88); q and k are then rounded to bf16 values, which AMX's split
    of each operand into two bf16 parts carries exactly — the case measures the softmax, not the split."""
    def build():
        max_s = max_len or S
        cache_k = randn(B, max_s, KV, hd)
        cache_v = randn(B, max_s, KV, hd)
        q = randn(B, T, H, hd)
        if score_scale:
            q, cache_k = (bf16_to_f32(f32_to_bf16(a * F32(score_scale))) for a in (q, cache_k))
        start = S - T
        if mask is None:
            m = None  # every key visible (SigLIP)
        elif mask == "blind":  # row 0's first query sees no key at all: the average of all of v
            m = rng.random((B, T, S)) < 0.5
            m[0, 0] = False
        elif mask == "random":
            m = rng.random((B, T, S)) < 0.7
            m[:, :, 0] = True
        else:
            valid = np.ones((B, max_s), bool)
            valid[0, :min(3, S - 1)] = False  # left padding in row 0
            prefix = np.zeros((B, max_s), bool)
            if mask == "prefix":
                prefix[:, :S // 2] = True
            window = 5 if mask == "sliding" else None
            if mask == "sliding":
                prefix[:, :S // 3] = True
            m = prefix_lm_mask(valid, prefix & valid, start, T, window)
        return (q, cache_k[:, :S], cache_v[:, :S], m, hd ** -0.5, softcap)
    return build


def rope_case(B, T, H, hd):
    def build():
        pos = np.arange(1, T + 1)[None].repeat(B, 0) + rng.integers(0, 1000, (B, 1))
        cos, sin = rope_cos_sin(pos, hd, 10000.0)
        return (randn(B, T, H, hd), cos, sin)
    return build


CASES = []
for M, K, N in [(1, 1, 1), (1, 7, 3), (3, 17, 33), (1, 2048, 257), (4, 64, 100), (7, 127, 129),
                (8, 1152, 72), (9, 1152, 72),  # cuda: the last GEMV row count and the first tensor-core one
                (1, 16384, 40), (2, 4100, 1030),  # long rows (the down projection), odd widths
                (16, 256, 513), (65, 33, 17), (266, 128, 96), (257, 300, 70), (300, 2048, 130),
                # amx: 16-row x tiles and 32-deep steps at their edges, depth blocks of 256, groups of
                # 8 W blocks (256 rows) per thread, and x in chunks of 512 rows
                (17, 31, 15), (32, 32, 32), (33, 257, 300), (48, 513, 17), (12, 16384, 40), (40, 600, 1000),
                (513, 40, 33), (1030, 64, 70)]:
    for bf16 in (False, True):
        CASES.append(("linear", f"M{M}-K{K}-N{N}-{'bf16' if bf16 else 'f32'}", linear_case(M, K, N, bias=M % 2 == 1, bf16=bf16)))
CASES.append(("linear", "batched-3d", linear_case(5, 24, 40, batch=(2,))))
for op in ("rms_norm", "layer_norm"):
    for shape in [(1, 1), (3, 7), (2, 5, 33), (17, 1152), (4, 2048)]:
        CASES.append((op, "x".join(map(str, shape)), norm_case(op, shape)))
    for shape in [(3, 7), (4, 2048)]:  # eps dominates mean(x²) / the variance; then is of their size
        CASES.append((op, "x".join(map(str, shape)) + "-eps-dominates", norm_case(op, shape, 1e-4, 0.0, 1e-6)))
        CASES.append((op, "x".join(map(str, shape)) + "-eps-matters", norm_case(op, shape, 1e-3, 0.0, 1e-6)))
for shape in [(1,), (7,), (3, 33), (2, 5, 1000)]:
    sid = "x".join(map(str, shape))
    CASES.append(("gelu_tanh", sid, lambda shape=shape: (randn(*shape, scale=4.0),)))
    CASES.append(("geglu", sid, lambda shape=shape: (randn(*shape, scale=4.0), randn(*shape))))
    CASES.append(("softcap", sid, lambda shape=shape: (randn(*shape, scale=80.0), 30.0)))
for B, T, H, hd in [(1, 1, 1, 2), (1, 3, 2, 8), (2, 5, 8, 16), (1, 266, 8, 256), (3, 1, 1, 256)]:
    CASES.append(("rope", f"B{B}-T{T}-H{H}-hd{hd}", rope_case(B, T, H, hd)))
for args in [
    dict(B=1, T=1, S=1, H=1, KV=1, hd=8),
    dict(B=1, T=7, S=7, H=4, KV=4, hd=16),  # plain MHA, whole prefill
    dict(B=2, T=9, S=9, H=8, KV=1, hd=32),  # MQA (PaliGemma 1)
    dict(B=2, T=9, S=9, H=8, KV=4, hd=32, mask="sliding"),  # GQA 2
    dict(B=1, T=1, S=40, H=8, KV=1, hd=256, max_len=64),  # decode, strided cache view
    dict(B=2, T=1, S=2048, H=8, KV=1, hd=64, max_len=2100),  # long cache
    dict(B=1, T=3, S=100, H=16, KV=2, hd=24, mask="random"),  # GQA 8
    dict(B=1, T=5, S=20, H=4, KV=2, hd=16, softcap=50.0),  # Gemma 2 soft-cap
    dict(B=1, T=266, S=266, H=8, KV=1, hd=256),  # PaliGemma-3B prefill
    dict(B=2, T=64, S=64, H=4, KV=4, hd=72, mask=None),  # SigLIP so400m heads (hd 72), no mask
    dict(B=2, T=4, S=300, H=8, KV=2, hd=256, max_len=320),  # cuda: the largest decode-kernel T
    dict(B=1, T=5, S=300, H=8, KV=2, hd=256, max_len=320),  # cuda: the smallest prefill-kernel T
    dict(B=1, T=3, S=50, H=2, KV=1, hd=512, softcap=30.0),  # the widest head the kernels take
    dict(B=2, T=2, S=300, H=2, KV=1, hd=33, mask="blind"),  # cuda: a query blind to all keys, split-KV
    dict(B=1, T=6, S=70, H=1, KV=1, hd=1, mask="blind"),  # the same in the prefill kernel, hd 1
    # cpp: prefill as two GEMMs from 32 query rows (per kv head) and 32 keys on, 512 rows per pass
    dict(B=2, T=9, S=40, H=8, KV=2, hd=33, mask="sliding", max_len=50),  # GQA 4, strided cache, odd hd
    dict(B=1, T=70, S=70, H=8, KV=1, hd=64),  # 560 rows: two passes
    dict(B=1, T=40, S=40, H=2, KV=1, hd=16, softcap=50.0, mask="blind"),
    dict(B=1, T=32, S=32, H=1, KV=1, hd=8, mask="random"),
    # scores up to ~1e3 (exp overflows without the max subtracted), with and without a soft-cap
    # above 88: decode, small prefill (fused tiles) and the GEMM prefill
    *(dict(**shape, score_scale=21.0, softcap=cap) for cap in (None, 500.0) for shape in (
        dict(B=1, T=1, S=40, H=4, KV=1, hd=16),
        dict(B=2, T=5, S=20, H=4, KV=2, hd=16),
        dict(B=1, T=40, S=40, H=2, KV=1, hd=16))),
]:
    name = "-".join(f"{k}{v}" for k, v in args.items())
    CASES.append(("attention", name, attention_case(**args)))
for V, D, bf16 in [(1, 1, False), (50, 7, False), (1000, 64, True)]:
    def build(V=V, D=D, bf16=bf16):
        table = randn(V, D)
        return (encode(table, Format.BF16 if bf16 else Format.F32), rng.integers(0, V, (2, 5)))
    CASES.append(("embedding", f"V{V}-D{D}-{'bf16' if bf16 else 'f32'}", build))

# MLX's affine quantization (refpg.formats): weights quantized exactly as mlx.core.quantize does
def affine_linear_case(M, K, N, bits, group_size, fmt=Format.BF16, bias=True):
    def build():
        w = quantize(randn(N, K, scale=K ** -0.5), bits, group_size, fmt)
        return (randn(M, K), w, randn(N) if bias else None)
    return build


for bits in AFFINE_BITS:
    CASES.append(("linear", f"affine{bits}-g64-bf16-M1-K256-N37", affine_linear_case(1, 256, 37, bits, 64)))
    CASES.append(("linear", f"affine{bits}-g32-bf16-M9-K96-N20", affine_linear_case(9, 96, 20, bits, 32)))
for bits in (4, 8):  # the widths with vector code: every group size and scale dtype, decode and prefill
    for group_size in AFFINE_GROUP_SIZES:
        for fmt in (Format.F32, Format.BF16, Format.F16):
            CASES.append(("linear", f"affine{bits}-g{group_size}-{fmt.value}-M1-K384-N33",
                          affine_linear_case(1, 384, 33, bits, group_size, fmt, bias=False)))
    for M in (2, 8, 40):
        CASES.append(("linear", f"affine{bits}-g64-bf16-M{M}-K2048-N257", affine_linear_case(M, 2048, 257, bits, 64)))
    # decode reads codes in 64-byte steps: K = 352 ends in a partial one (with either width)
    CASES.append(("linear", f"affine{bits}-g32-bf16-M3-K352-N37", affine_linear_case(3, 352, 37, bits, 32)))
    CASES.append(("linear", f"affine{bits}-g128-f32-M300-K512-N300", affine_linear_case(300, 512, 300, bits, 128, Format.F32)))
for bits in (2, 3, 5, 6):  # decode unpacks a tile's codes to bytes (AVX-512 VBMI, AVX2 or scalar) for the 8-bit loops
    CASES.append(("linear", f"affine{bits}-g32-bf16-M3-K352-N37", affine_linear_case(3, 352, 37, bits, 32)))
    CASES.append(("linear", f"affine{bits}-g128-f16-M1-K384-N33", affine_linear_case(1, 384, 33, bits, 128, Format.F16)))
    CASES.append(("linear", f"affine{bits}-g64-f32-M8-K2048-N257",
                  affine_linear_case(8, 2048, 257, bits, 64, Format.F32)))
for bits, fmt in [(4, Format.BF16), (8, Format.F32), (3, Format.F16), (6, Format.BF16)]:
    def build(bits=bits, fmt=fmt):
        return (quantize(randn(40, 128), bits, 32, fmt), rng.integers(0, 40, (2, 7)))
    CASES.append(("embedding", f"affine{bits}-g32-{fmt.value}-V40-D128", build))

OTHER_BACKENDS = ("cpp", "cuda")


def backend_param(be):
    if be == "cuda":
        return be  # skips in the test, or fails there under REFPG_REQUIRE_CUDA=1 (require_cuda_or_skip)
    if be in backend.UNAVAILABLE:
        return pytest.param(be, marks=pytest.mark.skip(reason=backend.UNAVAILABLE[be]))
    return be


# cpp runs with the best path of this CPU, and once forced to each instruction set the CPU has;
# cuda-fake runs cuda's op adapters (uploads, reshapes, views of strided caches) on tests/fake_cuda.py,
# which computes each op with refpg.ops: it proves the adapters keep every op's meaning, on any machine.
BACKEND_PATHS = [backend_param(b) for b in OTHER_BACKENDS] + ["cuda-fake"] + [
    pytest.param(f"cpp-{path}", marks=pytest.mark.skipif(why is not None, reason=why or ""))
    for path, why in simd_paths_here().items()]


@pytest.mark.parametrize("be", BACKEND_PATHS)
@pytest.mark.parametrize("op,case,build", CASES, ids=[f"{op}-{case}" for op, case, _ in CASES])
def test_op_matches_numpy_reference(be, op, case, build, request):
    if be == "cuda":
        require_cuda_or_skip()
    fake = be == "cuda-fake"
    if fake:
        request.getfixturevalue("fake_gpu")
        be = "cuda"
    path = None
    if be.startswith("cpp-"):
        be, path = "cpp", be[len("cpp-"):]
    if be not in backend.OPS[op]:
        pytest.skip(f"{be} has no {op} kernel")
    global rng
    rng = case_rng(op, case)
    args = build()
    fmt = backend.weight_format(args)
    if fmt is not None and fmt not in backend.BACKENDS[be].formats:
        pytest.skip(f"{be} has no {op} kernel for {fmt.value} weights")
    ref = backend.OPS[op]["numpy"](*args)
    with simd_path(path) if path else contextlib.nullcontext():
        out = backend.OPS[op][be](*args)
    assert not be == "cuda" or isinstance(out, DeviceArray), "a cuda op's result stays on the device"
    out = np.asarray(out)  # cuda: the result comes back from the GPU
    assert out.shape == ref.shape and out.dtype == np.float32
    assert (np.isfinite(out) == np.isfinite(ref)).all(), "NaN/Inf where the reference has none (or the reverse)"
    # the fake runs the same NumPy op: only BLAS blocking differs (a [2, 5, K] batch goes as [10, K])
    err, tol = backend.nmse(out, ref), 1e-12 if fake else backend.tolerance(op, be, fmt)
    assert err <= tol, f"{op} {case} on {be}: NMSE {err:.2e} > {tol:.0e}"


needs_cpp = pytest.mark.skipif("cpp" in backend.UNAVAILABLE, reason=backend.UNAVAILABLE.get("cpp", ""))


@needs_cpp
def test_linear_writes_only_inside_out():
    """Guard bands: a view into a larger buffer; every element around it must stay untouched."""
    from refpg import _C

    x, w, b = randn(7, 33), randn(19, 33), randn(19)
    buf = np.full((7 + 4, 19 + 6), 12345.0, F32)
    out = buf[2:9, 3:22]
    result = _C.linear(x, w, b, out=out)
    assert np.shares_memory(result, buf)
    inside = np.zeros(buf.shape, bool)
    inside[2:9, 3:22] = True
    assert (buf[~inside] == 12345.0).all()
    assert backend.nmse(out, x @ w.T + b) < 1e-12


@needs_cpp
@pytest.mark.parametrize("M", [7, 40])  # the GEMV and the GEMM
def test_linear_writes_only_inside_out_on_every_path(M):
    """Guard bands on each instruction set: `out` a view into a larger buffer, rows 36 floats apart."""
    from refpg import _C

    for path, why in simd_paths_here().items():
        if why:
            continue
        x, w, b = randn(M, 300), f32_to_bf16(randn(37, 300)), randn(37)
        buf = np.full((M + 4, 37 + 6), 12345.0, F32)
        out = buf[2:M + 2, 3:40]
        with simd_path(path):
            _C.linear(x, w, b, out=out)
        inside = np.zeros(buf.shape, bool)
        inside[2:M + 2, 3:40] = True
        assert (buf[~inside] == 12345.0).all(), path
        assert backend.nmse(out, backend.OPS["linear"]["numpy"](x, Matrix(w, Format.BF16), b)) < 1e-9, path


@needs_cpp
@pytest.mark.parametrize("bf16", [False, True], ids=["f32-weights", "bf16-weights"])
def test_linear_gemm_is_float32_accurate_on_every_path(bf16):
    """The op table's bound (5e-7) leaves room for bf16 rounding; this holds each path to float32-
    grade accuracy against float64: NMSE <= 1e-10. AMX splits every float32 operand into two bf16
    parts (measured ~3e-12 with bf16 weights, ~1e-11 with float32 ones); FMA paths give ~1e-13."""
    from refpg import _C

    x = randn(70, 2500)
    w = randn(300, 2500, scale=2500 ** -0.5)
    if bf16:
        w = f32_to_bf16(w)
    exact = x.astype(np.float64) @ (bf16_to_f32(w) if bf16 else w).astype(np.float64).T
    for path, why in simd_paths_here().items():
        if why:
            continue
        with simd_path(path):
            err = backend.nmse(_C.linear(x, w), exact)
        assert err <= 1e-10, f"{path}: NMSE {err:.1e}"


@needs_cpp
@pytest.mark.parametrize("bf16", [False, True], ids=["f32-weights", "bf16-weights"])
@pytest.mark.parametrize("M", [3, 40])
def test_linear_propagates_inf_and_nan_like_numpy(M, bf16):
    """inf, NaN (and values beyond bf16's range) in x or W come out as float32 makes them on every
    path — AMX hands such calls to its float32 FMA fallback."""
    from refpg import _C

    x = randn(M, 70)
    w = np.abs(randn(50, 70)) + F32(0.5)  # positive: inf times a row of W stays inf
    x[1, 5], x[2, 9] = np.inf, np.nan
    cases = [("x", x, w)]
    w_bad = w.copy()
    w_bad[7, 3] = -np.inf
    cases.append(("W", np.abs(randn(M, 70)), w_bad))
    if not bf16:
        x_big = randn(M, 70)
        x_big[0, 0] = 3.4e38  # finite in float32, inf in bf16
        cases.append(("x beyond bf16", x_big, w * F32(1e-38)))
    for path, why in simd_paths_here().items():
        if why:
            continue
        for what, xs, ws in cases:
            wk = f32_to_bf16(ws) if bf16 else ws
            ref = xs @ (bf16_to_f32(wk) if bf16 else wk).T
            with simd_path(path):
                out = _C.linear(xs, wk)
            np.testing.assert_array_equal(np.isnan(out), np.isnan(ref), err_msg=f"{path}, {what}: NaN pattern")
            np.testing.assert_array_equal(np.isinf(out), np.isinf(ref), err_msg=f"{path}, {what}: inf pattern")
            finite = np.isfinite(ref)
            np.testing.assert_array_equal(np.sign(out[~finite & ~np.isnan(ref)]), np.sign(ref[~finite & ~np.isnan(ref)]))
            assert backend.nmse(out[finite], ref[finite]) < 1e-9, f"{path}, {what}"


def affine_parts(rows, cols, bits, group_size, scales=None, biases=F32):
    """(codes, scales, biases) of an MLX affine matrix, the scales' shape or the biases' dtype changeable."""
    groups = scales or (rows, cols // group_size)
    return (np.zeros((rows, cols * bits // 32), np.uint32), np.ones(groups, F32),
            np.zeros((rows, cols // group_size), biases))


@needs_cpp
@pytest.mark.parametrize("call,message", [
    (lambda C: C.linear(randn(3, 4), randn(5, 6)), "linear: weight"),
    (lambda C: C.linear(randn(3, 4).astype(np.float64), randn(5, 4)), "linear: x must be float32"),
    (lambda C: C.linear(randn(4, 3).T, randn(5, 4)), "linear: x"),
    (lambda C: C.linear(randn(3, 4), randn(5, 4), randn(4)), "linear: bias"),
    (lambda C: C.linear(randn(3, 4), randn(5, 4), None, np.zeros((3, 5), F32)[:, ::-1]), "linear: out"),
    (lambda C: C.rms_norm(randn(3, 4), randn(5), 1e-6), "rms_norm: weight"),
    (lambda C: C.layer_norm(randn(3, 4), randn(4), randn(3), 1e-6), "layer_norm: bias"),
    (lambda C: C.geglu(randn(3, 4), randn(3, 5)), "geglu"),
    (lambda C: C.rope(randn(1, 2, 3, 4), randn(1, 2, 5), randn(1, 2, 5)), "rope"),
    (lambda C: C.attention(randn(1, 2, 3, 8), randn(1, 5, 2, 8), randn(1, 5, 2, 8), np.ones((1, 2, 5), bool), 0.1),
     "attention"),  # 3 heads over 2 kv heads
    (lambda C: C.attention(randn(1, 2, 4, 8), randn(1, 5, 2, 8), randn(1, 5, 2, 8), np.ones((1, 2, 4), bool), 0.1),
     "attention: mask"),
    (lambda C: C.embedding(randn(10, 4), np.array([[3, 10]])), "embedding"),  # id out of range
    (lambda C: C.embedding(randn(10, 4), np.array([[3, -1]])), "embedding"),
    (lambda C: C.rms_norm(randn(3, 4), randn(4), float("nan")), "rms_norm: eps must be a finite float32 >= 0"),
    (lambda C: C.layer_norm(randn(3, 4), randn(4), randn(4), -1e-6), "layer_norm: eps must be a finite float32 >= 0"),
    (lambda C: C.layer_norm(randn(3, 4), randn(4), randn(4), 1e39), "layer_norm: eps"),  # inf as a float32
    (lambda C: C.attention(randn(1, 2, 2, 8), randn(1, 5, 2, 8), randn(1, 5, 2, 8), None, float("inf")),
     "attention: scale must be a finite float32"),
    # MLX affine weights: a 4-bit [5, 64] matrix in groups of 32 has codes [5, 8], scales/biases [5, 2]
    (lambda C: C.linear_affine(randn(3, 64), *affine_parts(5, 64, 4, 32), 8, 32), "linear_affine: codes"),  # 8-bit codes: [5, 16]
    (lambda C: C.linear_affine(randn(3, 64), *affine_parts(5, 64, 4, 32), 7, 32), "linear_affine: bits must be"),
    (lambda C: C.linear_affine(randn(3, 64), *affine_parts(5, 64, 4, 32), 4, 48), "linear_affine: group_size must"),
    (lambda C: C.linear_affine(randn(3, 60), *affine_parts(5, 64, 4, 32), 4, 32), "linear_affine: group_size 32 does not divide the matrix's 60 columns"),
    (lambda C: C.linear_affine(randn(3, 64), *affine_parts(5, 64, 4, 32, scales=(5, 3)), 4, 32), "linear_affine: scales"),
    (lambda C: C.linear_affine(randn(3, 64), *affine_parts(5, 64, 4, 32, biases=np.float16), 4, 32),
     "linear_affine: biases must have the dtype of scales"),
    (lambda C: C.linear_affine(randn(3, 64), *affine_parts(5, 64, 4, 32), 4, 32, randn(4)), "linear_affine: bias"),
    (lambda C: C.embedding_affine(*affine_parts(5, 64, 4, 32), 4, 32, np.array([[0, 5]])), "embedding_affine: ids"),
])
def test_bad_calls_raise_value_errors_before_touching_memory(call, message):
    from refpg import _C

    with pytest.raises(ValueError, match=message):
        call(_C)


@needs_cpp
@pytest.mark.parametrize("value", ["sse9", "AVX2", "", "amx", "avx512"])
def test_a_bad_or_unavailable_simd_path_is_a_value_error_that_changes_nothing(value):
    from refpg import _C

    if simd_paths_here().get(value, "") is None:
        pytest.skip(f"this CPU has {value}")
    before = _C.simd_path()
    with pytest.raises(ValueError, match="^set_simd_path: name"):
        _C.set_simd_path(value)
    assert _C.simd_path() == before


@needs_cpp
def test_refpg_simd_is_read_once(monkeypatch):
    """The variable chooses the path at the first use; a later change to it reaches no kernel."""
    from refpg import _C

    before = _C.simd_path()
    monkeypatch.setenv("REFPG_SIMD", "sse9")
    assert _C.simd_path() == before
    x, w = randn(3, 4), randn(5, 4)
    assert backend.nmse(_C.linear(x, w), x @ w.T) < 1e-10


@needs_cpp
def test_a_bad_refpg_simd_fails_every_op_naming_it_until_a_path_is_set():
    """In a process started with a bad REFPG_SIMD (refpg's import reports it as a BackendError; see
    test_bad_input.py), a kernel called directly raises ValueError naming the op and the variable,
    simd_path the variable's own message, until set_simd_path chooses a path."""
    script = """if True:
        import numpy as np
        from refpg import _C
        x, w = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
        for call in (_C.simd_path, lambda: _C.linear(x, w), lambda: _C.rms_norm(x, w[0], 1e-6),
                     lambda: _C.gelu_tanh(x), lambda: _C.embedding(w, np.zeros(2, np.int64))):
            try:
                call()
                print("ran")
            except ValueError as e:
                print(e)
        _C.set_simd_path("scalar")
        print(_C.simd_path(), _C.linear(x, w)[0, 0])
    """
    proc = run_python(["-c", script], env={"REFPG_SIMD": "sse9"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 6, proc.stdout
    assert lines[0].startswith("REFPG_SIMD must be amx, avx512, avx2, scalar or auto, got 'sse9'")
    for line, op in zip(lines[1:5], ["linear", "rms_norm", "gelu_tanh", "embedding"]):
        assert line.startswith(f"{op}: REFPG_SIMD must be"), line
    assert lines[5] == "scalar 4.0"


@needs_cpp
@pytest.mark.parametrize("call, error, message", [
    (lambda C: C.softcap(randn(2, 3), 1e39), ValueError, "softcap: cap must be a finite float32 other than 0"),
    (lambda C: C.softcap(randn(2, 3), 0.0), ValueError, "softcap: cap must be a finite float32 other than 0"),
    (lambda C: C.attention(randn(1, 2, 1, 4), randn(1, 2, 1, 4), randn(1, 2, 1, 4), None, 0.5, -1e40), ValueError,
     "attention: logit_softcap must be a finite float32"),
    (lambda C: C.rms_norm(randn(2, 3), randn(3), True), TypeError, "rms_norm: eps must be a number, got <class 'bool'>"),
    (lambda C: C.layer_norm(randn(2, 3), randn(3), randn(3), -1e-6), ValueError, "layer_norm: eps must be a finite float32 >= 0"),
], ids=["cap-beyond-float32", "cap-zero", "attention-cap-beyond-float32", "eps-bool", "eps-negative"])
def test_scalar_arguments_are_finite_float32_numbers_or_named_errors(call, error, message):
    from refpg import _C

    with pytest.raises(error, match=re.escape(message)):
        call(_C)


def test_native_extension_provides_every_op_where_ci_requires_it(monkeypatch):
    """CI sets REFPG_REQUIRE_CPP=1: there the cpp rows above must run, not skip."""
    import os

    if not os.environ.get("REFPG_REQUIRE_CPP"):
        pytest.skip("REFPG_REQUIRE_CPP is not set (CI sets it)")
    assert "cpp" not in backend.UNAVAILABLE, backend.UNAVAILABLE.get("cpp")
    assert backend.available("cpp") == list(backend.OP_NAMES)


def test_sanitized_extension_is_the_one_imported_where_the_sanitizer_job_requires_it():
    """tools/sanitize.sh sets REFPG_REQUIRE_SANITIZED=1: the tests must run on the -fsanitize build."""
    import os

    if not os.environ.get("REFPG_REQUIRE_SANITIZED"):
        pytest.skip("REFPG_REQUIRE_SANITIZED is not set (tools/sanitize.sh sets it)")
    from refpg import _C

    assert _C.sanitized, f"{_C.__file__} was not built with REFPG_SANITIZE=ON"


@needs_cpp
def test_fma_peak_is_measured_on_every_path_and_checks_its_argument():
    """tools/bench.py divides prefill FLOPs by it: a finite, positive FLOP/s on each instruction set
    (its size is measured by the bench, not asserted here), and a bad duration refused."""
    from refpg import _C

    for path, why in simd_paths_here().items():
        if why is None:
            with simd_path(path):
                peak = _C.fma_peak(0.02)
            assert 0 < peak < 1e15, (path, peak)
    for bad in (-1.0, 100.0, float("nan")):
        with pytest.raises(ValueError, match="fma_peak: seconds"):
            _C.fma_peak(bad)
