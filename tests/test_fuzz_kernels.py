"""Seeded random calls, good and bad, to every CPU kernel of refpg._C.

Each call starts from valid random arguments and is left valid ("good", "empty": a zero-sized
dimension) or mutated in one way: a wrong dtype, rank or shape, a non-contiguous, reversed,
broadcast (zero-stride) or misaligned array, something that is not an array, a NaN / inf / huge /
non-numeric scalar (eps, scale, cap, n), out-of-range ids, a read-only or overlapping output, or
a name set_simd_path must refuse. The kernels run on an instruction set drawn per call.

What every call must do: raise ValueError or TypeError whose message names the op and the
argument (for a wrong rank or shape, one of the op's arrays; it may be the one it is checked
against), or return what the NumPy twin in refpg.ops returns on the same arguments (NaN/inf where
it has them, NMSE within the op's bound), without writing into its inputs. Anything else — another
exception, a wrong result, a changed input, a crash — is a failure.

The batch runs in a child interpreter (a crash in a kernel would otherwise kill pytest), which
reports each call; the tests below read that report. Run this file as a script to see it:
`python tests/test_fuzz_kernels.py [seed] [calls per op]`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest

from refpg import backend, ops
from refpg.formats import Format, Matrix, f32_to_bf16, quantize, stored_format

SEED = 15
CALLS_PER_OP = 48
F32 = np.float32

CATEGORIES = ("good", "empty", "dtype", "rank", "shape", "noncontiguous", "reversed", "zero-stride",
              "misaligned", "non-array", "scalar", "ids", "read-only", "overlap", "simd")
ANY_ARRAY_NAMED = ("rank", "shape")  # the error may name the array the changed one is checked against


# ---- valid random arguments per op ---------------------------------------------------------------
# Each op: dims(rng) -> named sizes (`fixed`: those the empty category must not zero); build(d, rng) -> {argument: value}; arrays: {argument: dtypes it
# may have}; scalars: the scalar arguments; twin(args) -> the NumPy result.

def randn(rng, *shape, scale=1.0):
    return np.asarray(rng.standard_normal(shape) * scale, F32)  # 0-d too: an array, not a scalar


def as_matrix(w) -> Matrix:
    """A weight as the binding reads it (float32, or bf16 bits as uint16), for the twin."""
    return Matrix(w, stored_format(np.asarray(w).dtype))


def bf16_or_f32(rng, w):
    return f32_to_bf16(w) if rng.random() < 0.5 else w


def linear_build(d, rng):
    args = {"x": randn(rng, d["M"], d["K"]), "weight": bf16_or_f32(rng, randn(rng, d["N"], d["K"], scale=d["K"] ** -0.5 if d["K"] else 1)),
            "bias": randn(rng, d["N"]) if rng.random() < 0.5 else None,
            "out": np.zeros((d["M"], d["N"]), F32) if rng.random() < 0.3 else None}
    return args


def norm_build(op):
    def build(d, rng):
        x = randn(rng, *d["lead"], d["D"], scale=3.0)
        if op == "rms_norm":
            return {"x": x, "weight": randn(rng, d["D"], scale=0.3), "eps": 1e-6}
        return {"x": x, "weight": 1 + randn(rng, d["D"], scale=0.3), "bias": randn(rng, d["D"], scale=0.1), "eps": 1e-6}
    return build


def rope_build(d, rng):
    pos = rng.integers(0, 500, (d["B"], d["T"]))
    cos, sin = ops.rope_cos_sin(pos, d["hd"], 10000.0) if d["hd"] else (np.zeros((d["B"], d["T"], 0), F32),) * 2
    return {"x": randn(rng, d["B"], d["T"], d["H"], d["hd"]), "cos": np.ascontiguousarray(cos, F32),
            "sin": np.ascontiguousarray(sin, F32)}


def attention_dims(rng):
    prefill = rng.random() < 0.25  # 32+ query rows per kv head and 32+ keys: the GEMM path
    return {"B": int(rng.integers(1, 3)), "T": int(rng.integers(32, 40) if prefill else rng.integers(1, 7)),
            "S": int(rng.integers(32, 45) if prefill else rng.integers(1, 40)), "KV": int(rng.integers(1, 3)),
            "group": int(rng.integers(1, 4)), "hd": int(rng.integers(1, 20))}


def attention_build(d, rng):
    B, T, S, KV, hd = d["B"], d["T"], d["S"], d["KV"], d["hd"]
    return {"q": randn(rng, B, T, KV * d["group"], hd), "k": randn(rng, B, S, KV, hd), "v": randn(rng, B, S, KV, hd),
            "mask": rng.random((B, T, S)) < 0.7 if rng.random() < 0.8 else None,
            "scale": float(hd ** -0.5) if hd else 1.0, "logit_softcap": 30.0 if rng.random() < 0.3 else None}


def embedding_build(d, rng):
    table = bf16_or_f32(rng, randn(rng, d["V"], d["D"]))
    return {"table": table, "ids": rng.integers(0, d["V"], tuple(d["ids"])) if d["V"] else np.zeros(d["ids"], np.int64)}


def affine_dims(rng):
    bits, group_size = [2, 3, 4, 5, 6, 8][int(rng.integers(6))], [32, 64, 128][int(rng.integers(3))]
    return {"M": int(rng.integers(1, 12)), "N": int(rng.integers(1, 20)), "groups": int(rng.integers(1, 4)),
            "V": int(rng.integers(1, 30)), "ids": shape(rng, 0, 2, 6), "bits": bits, "group_size": group_size}


def affine_weight(rng, rows, d) -> dict:
    """An MLX affine matrix [rows, groups · group_size] as quantize makes it, scales in a random dtype."""
    fmt = [Format.F32, Format.BF16, Format.F16][int(rng.integers(3))]
    m = quantize(randn(rng, rows, d["groups"] * d["group_size"]), d["bits"], d["group_size"], fmt)
    return {"codes": m.data, "scales": m.scales.data, "biases": m.biases.data, "bits": d["bits"],
            "group_size": d["group_size"]}


def affine_matrix(a) -> Matrix:
    """The twin's view of the binding's arguments (the scales' dtype says their format)."""
    part = lambda v: Matrix(v, stored_format(np.asarray(v).dtype))  # noqa: E731
    return Matrix(a["codes"], Format.AFFINE, a["bits"], a["group_size"], part(a["scales"]), part(a["biases"]))


def linear_affine_build(d, rng):
    w = affine_weight(rng, d["N"], d)
    return {"x": randn(rng, d["M"], d["groups"] * d["group_size"]), **w,
            "bias": randn(rng, d["N"]) if rng.random() < 0.5 else None}


def embedding_affine_build(d, rng):
    return {**affine_weight(rng, d["V"], d),
            "ids": rng.integers(0, d["V"], tuple(d["ids"])) if d["V"] else np.zeros(d["ids"], np.int64)}


def shape(rng, rank_lo, rank_hi, hi):
    return [int(s) for s in rng.integers(1, hi, int(rng.integers(rank_lo, rank_hi + 1)))]


F = ("float32",)
SCALE_DTYPES = ("float32", "uint16", "float16")
SPECS = {
    "linear": dict(
        dims=lambda rng: {"M": int(rng.integers(1, 40)), "K": int(rng.integers(1, 70)), "N": int(rng.integers(1, 40))},
        build=linear_build, arrays={"x": F, "weight": ("float32", "uint16"), "bias": F, "out": F}, scalars=(),
        optional=("bias", "out"), twin=lambda a: ops.linear(a["x"], as_matrix(a["weight"]), a["bias"])),
    "rms_norm": dict(
        dims=lambda rng: {"lead": shape(rng, 0, 2, 5), "D": int(rng.integers(1, 40))},
        build=norm_build("rms_norm"), arrays={"x": F, "weight": F}, scalars=("eps",),
        twin=lambda a: ops.rms_norm(a["x"], a["weight"], a["eps"])),
    "layer_norm": dict(
        dims=lambda rng: {"lead": shape(rng, 0, 2, 5), "D": int(rng.integers(1, 40))},
        build=norm_build("layer_norm"), arrays={"x": F, "weight": F, "bias": F}, scalars=("eps",),
        twin=lambda a: ops.layer_norm(a["x"], a["weight"], a["bias"], a["eps"])),
    "gelu_tanh": dict(
        dims=lambda rng: {"s": shape(rng, 0, 3, 9)}, build=lambda d, rng: {"x": randn(rng, *d["s"], scale=4.0)},
        arrays={"x": F}, scalars=(), twin=lambda a: ops.gelu_tanh(a["x"])),
    "geglu": dict(
        dims=lambda rng: {"s": shape(rng, 0, 3, 9)},
        build=lambda d, rng: {"gate": randn(rng, *d["s"], scale=4.0), "up": randn(rng, *d["s"])},
        arrays={"gate": F, "up": F}, scalars=(), twin=lambda a: ops.geglu(a["gate"], a["up"])),
    "softcap": dict(
        dims=lambda rng: {"s": shape(rng, 0, 3, 9)},
        build=lambda d, rng: {"x": randn(rng, *d["s"], scale=80.0), "cap": 30.0 if rng.random() < 0.8 else None},
        arrays={"x": F}, scalars=("cap",), optional=("cap",), twin=lambda a: ops.softcap(a["x"], a["cap"])),
    "rope": dict(
        dims=lambda rng: {"B": int(rng.integers(1, 3)), "T": int(rng.integers(1, 5)), "H": int(rng.integers(1, 4)),
                          "hd": 2 * int(rng.integers(1, 9))},
        build=rope_build, arrays={"x": F, "cos": F, "sin": F}, scalars=(),
        twin=lambda a: ops.rope(a["x"], a["cos"], a["sin"])),
    "attention": dict(
        dims=attention_dims, build=attention_build, arrays={"q": F, "k": F, "v": F, "mask": ("bool",)},
        scalars=("scale", "logit_softcap"), optional=("mask", "logit_softcap"),
        twin=lambda a: ops.attention(a["q"], a["k"], a["v"], a["mask"], a["scale"], a["logit_softcap"])),
    "embedding": dict(
        dims=lambda rng: {"V": int(rng.integers(1, 50)), "D": int(rng.integers(1, 16)), "ids": shape(rng, 0, 2, 6)},
        build=embedding_build, arrays={"table": ("float32", "uint16"), "ids": ("int64",)}, scalars=(),
        twin=lambda a: ops.embedding(as_matrix(a["table"]), a["ids"])),
    # weights in MLX's affine quantization (refpg.formats); the scalars are the code width and group size
    "linear_affine": dict(
        dims=affine_dims, build=linear_affine_build, scalars=("bits", "group_size"), optional=("bias",),
        fixed=("bits", "group_size"),
        arrays={"x": F, "codes": ("uint32",), "scales": SCALE_DTYPES, "biases": SCALE_DTYPES, "bias": F},
        twin=lambda a: ops.linear(a["x"], affine_matrix(a), a["bias"])),
    "embedding_affine": dict(
        dims=affine_dims, build=embedding_affine_build, scalars=("bits", "group_size"), fixed=("bits", "group_size"),
        arrays={"codes": ("uint32",), "scales": SCALE_DTYPES, "biases": SCALE_DTYPES, "ids": ("int64",)},
        twin=lambda a: ops.embedding(affine_matrix(a), a["ids"])),
}
OP_NAMES = tuple(SPECS) + ("set_num_threads",)


# ---- mutations: (category, rng, spec, args) -> (args, target argument) or None (not applicable) ----

WRONG_DTYPES = ("float64", "float16", "int32", "int64", "uint8", "bool", "complex64", "float32", "uint16")
BAD_SCALARS = (float("nan"), float("inf"), -float("inf"), 1e30, -1.0, 0.0, 1e-30, 2 ** 70, "1e-6", None, [1.0])


def random_like(rng, a, shape):
    if a.dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if a.dtype == np.int64:
        return np.asarray(rng.integers(0, 2, shape))
    return np.asarray(rng.standard_normal(shape), a.dtype)


def strided(a, axis):
    """The same values, every other element of a buffer twice as long along `axis`."""
    buf = np.zeros(tuple(s * 2 if i == axis else s for i, s in enumerate(a.shape)), a.dtype)
    index = tuple(slice(None, None, 2) if i == axis else slice(None) for i in range(a.ndim))
    buf[index] = a
    return buf[index]


def misaligned(a):
    buf = bytearray(a.nbytes + 1)
    m = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    m[...] = a
    return m


def mutate(category, rng, spec, args):
    arrays = [n for n in spec["arrays"] if isinstance(args.get(n), np.ndarray)]
    name = arrays[int(rng.integers(len(arrays)))] if arrays else None
    a = args.get(name)
    new = dict(args)
    if category == "dtype":
        wrong = [t for t in WRONG_DTYPES if t not in spec["arrays"][name]]
        new[name] = a.astype(wrong[int(rng.integers(len(wrong)))])
    elif category == "rank":
        how = int(rng.integers(3))
        new[name] = a[None] if how == 0 else a[..., None] if how == 1 else a.reshape(-1)
        if new[name].shape == a.shape:
            new[name] = a[None]
    elif category == "shape":
        if a.ndim == 0:
            return None
        axis = int(rng.integers(a.ndim))
        s = list(a.shape)
        s[axis] = s[axis] + 1 if s[axis] == 0 or rng.random() < 0.5 else s[axis] - 1
        new[name] = random_like(rng, a, s)
    elif category == "noncontiguous":
        if a.ndim == 0:
            return None
        new[name] = strided(a, int(rng.integers(a.ndim)))
    elif category == "reversed":
        if a.ndim == 0:
            return None
        new[name] = np.flip(a, int(rng.integers(a.ndim)))
    elif category == "zero-stride":
        if a.ndim == 0:
            return None
        axis = int(rng.integers(a.ndim))
        if a.shape[axis] == 0:
            return None
        new[name] = np.broadcast_to(a.take([0], axis), a.shape)
    elif category == "misaligned":
        new[name] = misaligned(a)
    elif category == "non-array":
        choices = [a.tolist(), 1.5, "x", {"x": 1}, (1, 2)] + ([None] if name not in spec.get("optional", ()) else [])
        new[name] = choices[int(rng.integers(len(choices)))]
    elif category == "scalar":
        if not spec["scalars"]:
            return None
        name = spec["scalars"][int(rng.integers(len(spec["scalars"])))]
        new[name] = BAD_SCALARS[int(rng.integers(len(BAD_SCALARS)))]
    elif category == "ids":
        if "ids" not in args or args["ids"].size == 0:
            return None
        name = "ids"
        ids = args["ids"].copy()
        V = args["table" if "table" in args else "codes"].shape[0]
        ids.flat[int(rng.integers(ids.size))] = [-1, V, 2 ** 62, -(2 ** 63)][int(rng.integers(4))]
        new["ids"] = ids
    elif category == "read-only":  # the argument written to: linear's out
        name = "out"
        new[name] = np.zeros((args["x"].shape[0], args["weight"].shape[0]), F32)
        new[name].flags.writeable = False
    elif category == "overlap":  # out is x itself (weight [K, K]) or, with f32 weights, a view of weight
        name = "out"
        K = args["x"].shape[1]
        new["weight"] = randn(rng, K, K)
        new["bias"] = None
        new["out"] = new["x"] if rng.random() < 0.5 else new["weight"][:args["x"].shape[0]]
        if new["out"].shape != (args["x"].shape[0], K):
            new["out"] = new["x"]
    else:
        raise ValueError(category)
    return new, name


# ---- one call and its verdict --------------------------------------------------------------------

def names_op_and_argument(message, op, names):
    return re.search(rf"\b{re.escape(op)}\b", message) and any(re.search(rf"\b{re.escape(n)}\b", message) for n in names)


def call_kernel(C, op, args):
    if op == "linear":
        return C.linear(args["x"], args["weight"], args["bias"], out=args["out"])
    return getattr(C, op)(**args)


def snapshot(args):
    return {n: a.copy() for n, a in args.items() if isinstance(a, np.ndarray)}


def verdict(C, op, category, args, target, path):
    """'error' or 'match' when the call behaved, else a description of what went wrong."""
    spec = SPECS[op]
    kept = C.simd_path()
    if category == "simd":  # a name no path has, or a path this CPU lacks: refused, nothing changed
        try:
            C.set_simd_path(path)
            return f"set_simd_path({path!r}) was accepted"
        except ValueError as e:
            if not names_op_and_argument(str(e), "set_simd_path", ["name"]):
                return f"ValueError not naming set_simd_path and name: {e}"
        return "error" if C.simd_path() == kept else "a refused set_simd_path changed the path"
    before = snapshot(args)
    C.set_simd_path(path)  # the path is process-wide: the one that was current comes back below
    try:
        result = call_kernel(C, op, args)
    except (ValueError, TypeError) as e:
        if category == "good":
            return f"a valid call raised {type(e).__name__}: {e}"
        names = list(spec["arrays"]) + list(spec["scalars"]) if category in ANY_ARRAY_NAMED + ("empty",) else [target]
        if not names_op_and_argument(str(e), op, names):
            return f"{type(e).__name__} not naming {op} and {' / '.join(names)}: {e}"
        return "error"
    except Exception as e:  # noqa: BLE001 — any other exception is the finding
        return f"raised {type(e).__name__} (not ValueError/TypeError): {e}"
    finally:
        C.set_simd_path(kept)
    for n, a in before.items():
        if n != "out" and not np.array_equal(args[n], a, equal_nan=True):
            return f"the kernel wrote into its input {n}"
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the twins' means over D = 0
            ref = spec["twin"]({n: (before.get(n, v)) for n, v in args.items()})
    except Exception as e:  # noqa: BLE001
        return f"accepted arguments its NumPy twin rejects ({type(e).__name__}: {e})"
    if op == "linear" and isinstance(args["out"], np.ndarray) and result is not args["out"]:
        return "linear did not return out"
    out, ref = np.asarray(result), np.asarray(ref)
    if out.shape != ref.shape or out.dtype != np.float32:
        return f"result {out.shape} {out.dtype}, twin {ref.shape} {ref.dtype}"
    if not np.array_equal(np.isnan(out), np.isnan(ref)) or not np.array_equal(np.isinf(out), np.isinf(ref)):
        return "NaN/inf where the twin has none (or the reverse)"
    finite = np.isfinite(ref)
    twin_op, fmt = (op[:-len("_affine")], Format.AFFINE) if op.endswith("_affine") else (op, None)
    err, tol = nmse_floored(out[finite], ref[finite], input_scale(before)), backend.tolerance(twin_op, "cpp", fmt)
    if err > tol:
        return f"NMSE {err:.2e} > {tol:.0e}"
    return "match"


def input_scale(arrays):
    """The largest finite magnitude among the float inputs (at least 1)."""
    m = [np.abs(a[np.isfinite(a)]).max() for a in arrays.values() if a.dtype == np.float32 and np.isfinite(a).any()]
    return max([1.0] + [float(v) for v in m])


def nmse_floored(out, ref, scale):
    """Σ(out − ref)² / Σ max(ref², (1e-3·scale)²): the op table's NMSE, except that outputs far below
    the inputs' magnitude count as that small — there both sides are float32 rounding noise (gelu's
    1 + tanh cancels for x below about −4, leaving ~1e-7·|x|), and NMSE alone would call noise a
    disagreement. An error of the inputs' order still fails by orders of magnitude."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.size == 0:
        return 0.0
    denom = float(np.maximum(ref * ref, (1e-3 * scale) ** 2).sum())
    return float(((out - ref) ** 2).sum()) / denom


def threads_verdict(C, rng, cores):
    """set_num_threads with a random n, good or bad; after it a kernel must still run right."""
    good = int(rng.integers(-3, 5))
    n, category = (good, "good") if rng.random() < 0.4 else (
        [1025, 10 ** 9, 10 ** 30, 2.5, "2", None, True, [2], float("nan")][int(rng.integers(9))], "scalar")
    if rng.random() < 0.2:
        n, category = np.int64(int(rng.integers(1, 4))), "good"
    before = C.num_threads()
    try:
        C.set_num_threads(n)
    except (ValueError, TypeError) as e:
        if category == "good":
            return category, f"set_num_threads({n!r}) raised {e}"
        if C.num_threads() != before:
            return category, "a refused set_num_threads changed the pool"
        return category, "error" if names_op_and_argument(str(e), "set_num_threads", ["n"]) else f"error not naming n: {e}"
    except Exception as e:  # noqa: BLE001
        return category, f"raised {type(e).__name__}: {e}"
    want = int(n) if int(n) > 0 else cores
    if C.num_threads() != want:
        return category, f"set_num_threads({n!r}) left {C.num_threads()} threads, not {want}"
    x, w = np.ones((64, 256), F32), np.zeros(256, F32)
    if not np.allclose(C.rms_norm(x, w, 1e-6), 1.0, atol=1e-5):
        return category, f"rms_norm wrong after set_num_threads({n!r})"
    return category, "match"


def categories_of(op):
    spec = SPECS[op]
    skip = set()
    if not spec["scalars"]:
        skip.add("scalar")
    if op != "embedding":
        skip.add("ids")
    if op != "linear":  # the op that writes into an argument
        skip |= {"read-only", "overlap"}
    return [c for c in CATEGORIES if c not in skip]


def simd_paths(C):
    f = C.cpu_features()
    avx2 = f["avx2"] and f["fma"]
    have = {"amx": f["amx_bf16"] and avx2, "avx512": f["avx512f"] and avx2, "avx2": avx2, "scalar": True}
    return [p for p, ok in have.items() if ok], [p for p, ok in have.items() if not ok]


def run_batch(seed, calls_per_op, progress=None):
    """Every call of the batch as a record {op, category, path, verdict}."""
    from refpg import _C as C

    rng = np.random.default_rng(seed)
    paths, missing = simd_paths(C)
    cores, threads = C.num_threads(), C.num_threads()
    records = []
    for op in OP_NAMES:
        for i in range(calls_per_op):
            if progress:
                progress(f"{op} #{i}")
            if op == "set_num_threads":
                category, v = threads_verdict(C, rng, cores)
                records.append(dict(op=op, category=category, path="-", verdict=v))
                continue
            spec = SPECS[op]
            mine = categories_of(op)  # each applicable category once, then drawn at random
            category = mine[i] if i < len(mine) else mine[int(rng.integers(len(mine)))]
            d = spec["dims"](rng)
            if category == "empty":
                sizes = [k for k, v in d.items() if k not in spec.get("fixed", ())
                         and (isinstance(v, int) or (isinstance(v, list) and v))]
                if not sizes:  # a 0-d array has no dimension to empty
                    category = "good"
                else:
                    k = sizes[int(rng.integers(len(sizes)))]
                    if isinstance(d[k], list):
                        d[k][int(rng.integers(len(d[k])))] = 0
                    else:
                        d[k] = 0
            args = spec["build"](d, rng)
            path = paths[int(rng.integers(len(paths)))]
            target = None
            if category == "simd":
                path = (missing + ["sse9", "AVX2", "", "avx-512"])[int(rng.integers(len(missing) + 4))]
                target = "name"
            elif category not in ("good", "empty"):
                mutated = mutate(category, rng, spec, args)
                if mutated is None:
                    category = "good"
                else:
                    args, target = mutated
            v = verdict(C, op, category, args, target, path)
            records.append(dict(op=op, category=category, path=path, verdict=v))
    C.set_num_threads(threads)
    return records


def summary(records):
    lines = [f"{'category':14} {'calls':>6} {'errors':>7} {'matches':>8} {'failures':>9}"]
    for cat in CATEGORIES:
        rs = [r for r in records if r["category"] == cat]
        c = Counter("error" if r["verdict"] == "error" else "match" if r["verdict"] == "match" else "failure" for r in rs)
        lines.append(f"{cat:14} {len(rs):6} {c['error']:7} {c['match']:8} {c['failure']:9}")
    return "\n".join(lines)


# ---- the tests: the batch in a child interpreter, its report checked per op ----------------------

needs_cpp = pytest.mark.skipif("cpp" in backend.UNAVAILABLE, reason=backend.UNAVAILABLE.get("cpp", ""))


@pytest.fixture(scope="module")
def report():
    from conftest import run_python  # here, not at the top: the child imports this module too

    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import json, test_fuzz_kernels as f; "
              f"print(json.dumps(f.run_batch({SEED}, {CALLS_PER_OP}, lambda s: print(s, file=sys.stderr, flush=True))))")
    try:
        proc = run_python(["-c", script], timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the fuzz batch hung; last calls: {(e.stderr or '')[-300:]}")
    last = proc.stderr.strip().splitlines()[-3:]
    assert proc.returncode == 0, f"the fuzz batch died (exit {proc.returncode}) at or after: {last}\n{proc.stderr[-3000:]}"
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\nkernel fuzz, seed", SEED, "\n" + summary(records))
    return records


@needs_cpp
@pytest.mark.parametrize("op", OP_NAMES)
def test_fuzzed_calls_raise_named_value_or_type_errors_or_match_numpy(report, op):
    records = [r for r in report if r["op"] == op]
    failures = [r for r in records if r["verdict"] not in ("error", "match")]
    assert not failures, "\n".join(f"{r['category']} ({r['path']}): {r['verdict']}" for r in failures[:10])
    outcomes = Counter(r["verdict"] for r in records)
    assert outcomes["error"] and outcomes["match"], f"{op}: the batch should hold both refused and computed calls: {outcomes}"


@needs_cpp
def test_fuzz_batch_exercises_every_category(report):
    seen = Counter(r["category"] for r in report)
    assert all(seen[c] for c in CATEGORIES), summary(report)
    assert len(report) == len(OP_NAMES) * CALLS_PER_OP


if __name__ == "__main__":
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else SEED
    n = int(sys.argv[2]) if len(sys.argv) > 2 else CALLS_PER_OP
    recs = run_batch(seed, n)
    print(summary(recs))
    for r in recs:
        if r["verdict"] not in ("error", "match"):
            print(f"{r['op']} {r['category']} ({r['path']}): {r['verdict']}")
