"""A stand-in for refpg._C.cuda that keeps "device" memory in NumPy, for machines without a GPU.

It mirrors the C++ side's contract — `Tensor` views (element offset, shape, strides) checked
against their storage, the same argument checks as csrc/bind_cuda.cpp (dtypes, shapes,
contiguity), fresh outputs — and computes each op with refpg.ops. The CUDA kernels themselves are
not exercised: what this tests is everything around them — DeviceArray views and arithmetic, the
weights uploaded once, the KV cache on the device, per-pass constants, the mixed-selection copies —
and it counts host↔device transfers, so a test can prove none happen per op.
"""

from __future__ import annotations

import numpy as np

from refpg import ops
from refpg.formats import Format, Matrix, stored_format

compiled = True
transfers = {"upload": 0, "download": 0}


class Tensor:
    def __init__(self, storage: np.ndarray, offset: int, shape, strides):
        self.storage, self.offset = storage, int(offset)
        self.shape, self.strides = tuple(int(s) for s in shape), tuple(int(s) for s in strides)

    @property
    def dtype(self):
        return self.storage.dtype

    @property
    def contiguous(self) -> bool:
        expect = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides)):
            if size != 1 and stride != expect:
                return False
            expect *= size
        return True

    def inner_contiguous(self, inner: int) -> bool:
        expect = 1
        for size, stride in list(zip(reversed(self.shape), reversed(self.strides)))[:inner]:
            if size != 1 and stride != expect:
                return False
            expect *= size
        return True

    def same_storage(self, other) -> bool:
        return self.storage is other.storage

    def view(self, offset, shape, strides):
        if len(shape) != len(strides) or offset < 0 or any(s < 0 for s in list(shape) + list(strides)):
            raise IndexError("bad view")
        n = int(np.prod(shape, dtype=np.int64))
        last = offset + sum((s - 1) * st for s, st in zip(shape, strides) if s > 0)
        if n > 0 and last >= self.storage.size:
            raise IndexError(f"view reaches element {last} of a storage of {self.storage.size}")
        return Tensor(self.storage, offset, shape, strides)

    def host_view(self) -> np.ndarray:
        """The elements as a NumPy view (no transfer counted: kernels read device memory)."""
        item = self.storage.itemsize
        return np.lib.stride_tricks.as_strided(self.storage[self.offset:], self.shape,
                                               [s * item for s in self.strides], writeable=True)


def _new(a: np.ndarray) -> Tensor:
    a = np.ascontiguousarray(a)
    flat = a.reshape(-1).copy()
    strides = [int(s // a.itemsize) for s in a.strides] if a.size else [1] * a.ndim
    return Tensor(flat, 0, a.shape, strides)


def _dense(t, name="x") -> np.ndarray:
    assert isinstance(t, Tensor), f"{name} must be a device tensor, got {type(t).__name__}"
    if not t.contiguous:
        raise ValueError(f"{name} must be contiguous")
    return t.host_view()


def _f32(t, name="x") -> np.ndarray:
    a = _dense(t, name)
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32")
    return a


# ---- runtime ----------------------------------------------------------------------------------

def device_count():
    return 1


def unavailable_reason():
    return ""


def synchronize():
    pass


def device_info():
    return {"name": "fake (NumPy)", "sm_count": 1, "compute_capability": "0.0", "total_bytes": 0, "free_bytes": 0}


def empty(shape, dtype=np.float32):
    return _new(np.empty(shape, dtype))


def zeros(shape, dtype=np.float32):
    return _new(np.zeros(shape, dtype))


def upload(a):
    transfers["upload"] += 1
    a = np.asarray(a)
    assert a.dtype in (np.float32, np.uint16, np.float16, np.uint32, np.int64, np.bool_), a.dtype
    return _new(a)


def download(t):
    transfers["download"] += 1
    return np.array(t.host_view(), copy=True)


def copy(dst, src):
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError("copy: shape or dtype differ")
    if dst.storage is src.storage:
        raise ValueError("copy: dst and src share memory")
    dst.host_view()[...] = src.host_view()


def scatter_rows(dst, rows, src):
    d, s = _f32(dst, "dst"), _f32(src, "src")
    assert d.ndim == 2 and s.ndim == 2 and d.shape[1] == s.shape[1] and len(rows) == len(s)
    assert dst.storage is not src.storage
    transfers["upload"] += 1  # the row indices go up, as in csrc/bind_cuda.cpp
    d[np.asarray(rows)] = s


# ---- ops ----------------------------------------------------------------------------------------

def _matrix(t, name) -> Matrix:
    """A weight as the binding reads it: float32, or bf16 bits (uint16)."""
    data = _dense(t, name)
    return Matrix(data, stored_format(data.dtype))


def _affine(codes, scales, biases, bits, group_size) -> Matrix:
    """An MLX affine matrix as the binding reads it (the scales' dtype says their format)."""
    s, b = _dense(scales, "scales"), _dense(biases, "biases")
    return Matrix(_dense(codes, "codes"), Format.AFFINE, bits, group_size, Matrix(s, stored_format(s.dtype)),
                  Matrix(b, stored_format(b.dtype)))


def linear_affine(x, codes, scales, biases, bits, group_size, b=None):
    assert isinstance(x, Tensor) and len(x.shape) == 2 and x.inner_contiguous(1)
    w = _affine(codes, scales, biases, bits, group_size)
    return _new(ops.linear(x.host_view(), w, None if b is None else _f32(b, "bias")))


def embedding_affine(codes, scales, biases, bits, group_size, ids):
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64  # ids come from the host
    transfers["upload"] += 1
    return _new(ops.embedding(_affine(codes, scales, biases, bits, group_size), ids))


def linear(x, w, b=None):
    assert isinstance(x, Tensor) and len(x.shape) == 2 and x.inner_contiguous(1)
    return _new(ops.linear(x.host_view(), _matrix(w, "weight"), None if b is None else _f32(b, "bias")))


def rms_norm(x, w, eps):
    return _new(ops.rms_norm(_f32(x), _f32(w, "weight"), eps))


def layer_norm(x, w, b, eps):
    return _new(ops.layer_norm(_f32(x), _f32(w, "weight"), _f32(b, "bias"), eps))


def gelu_tanh(x):
    return _new(ops.gelu_tanh(_f32(x)))


def geglu(g, u):
    return _new(ops.geglu(_f32(g, "gate"), _f32(u, "up")))


def softcap(x, cap):
    return _new(ops.softcap(_f32(x), cap))


def add(a, b):
    x, y = _f32(a, "a"), _f32(b, "b")
    assert x.shape[x.ndim - y.ndim:] == y.shape, (x.shape, y.shape)
    return _new(x + y)


def scale(a, s):
    return _new(_f32(a, "a") * np.float32(s))


def rope(x, cos, sin):
    return _new(ops.rope(_f32(x), _f32(cos, "cos"), _f32(sin, "sin")))


def embedding(table, ids):
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64  # ids come from the host
    transfers["upload"] += 1
    return _new(ops.embedding(_matrix(table, "table"), ids))


def attention(q, k, v, mask, scale, softcap=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert isinstance(t, Tensor) and t.inner_contiguous(2), f"{name} must be contiguous in its last 2 dims"
    m = None if mask is None else mask.host_view()
    return _new(ops.attention(q.host_view(), k.host_view(), v.host_view(), m, scale, softcap))
