"""The `cuda` backend: GPU memory the model code can use like an array, and the op adapters.

`DeviceArray` wraps a strided view of GPU memory (`refpg._C.cuda.Tensor`, whose views are checked
against their allocation in C++). It does, on the GPU, the little the model does between ops:
`reshape`, basic slicing (views), `+` (the residual stream, with a trailing-shape broadcast such as
[B, N, D] + [N, D]), `*` by a number, `copy()`, writing into a slice (the KV cache) and into the
rows a boolean mask picks (image features at the <image> positions). `np.asarray(a)` copies it to
the host — that is how the logits come out.

Data placement on the `cuda` path: weights are uploaded once, when the model loads
(`prepare_weights`); the KV cache is allocated on the GPU (beside the keys it holds); within one
forward pass a host array is uploaded once however many ops read it (the token ids or pixels, the
RoPE tables, the masks), never per op; the logits come out. A selection that mixes `cuda` with CPU
backends copies arrays across at each switch (the dispatcher calls `adopt`), which is slow and
only meant for bisecting a disagreement.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import numbers

import numpy as np

from refpg.backends.base import OP_NAMES, Backend
from refpg.formats import Format, Matrix

try:
    from refpg import _C
except ImportError:  # the NumPy reference works without the extension
    _C = None


def unavailable_reason() -> str | None:
    """Why the cuda backend cannot run here, or None when it can."""
    if _C is None:
        return "the native extension refpg._C is not importable; build it with `pip install .`"
    if not _C.cuda.compiled:
        return "refpg was built without its CUDA kernels (nvcc was not found at build time, or REFPG_CUDA=OFF)"
    return _C.cuda.unavailable_reason() or None


class DeviceArray:
    """A float32 / bf16 (uint16 bits) / int64 / bool array in GPU memory. See the module docstring."""

    __slots__ = ("t",)
    __array_ufunc__ = None  # numpy defers to our reflected operators instead of downloading us

    def __init__(self, tensor):
        self.t = tensor

    # ---- what an array tells about itself --------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.t.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.t.dtype

    @property
    def ndim(self) -> int:
        return len(self.t.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.t.shape, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"

    def __array__(self, dtype=None, copy=None):
        host = _C.cuda.download(self.t)
        return host if dtype is None else host.astype(dtype)

    # ---- views and copies ------------------------------------------------------------------
    def contiguous(self) -> "DeviceArray":
        return self if self.t.contiguous else self.copy()

    def copy(self) -> "DeviceArray":
        out = _C.cuda.empty(list(self.shape), self.dtype)
        _C.cuda.copy(out, self.t)
        return DeviceArray(out)

    def reshape(self, *shape) -> "DeviceArray":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = list(shape)
        if shape.count(-1) > 1:
            raise ValueError("can only specify one unknown dimension")
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
            shape[shape.index(-1)] = self.size // known if known else 0
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            raise ValueError(f"cannot reshape array of size {self.size} into shape {tuple(shape)}")
        src = self.contiguous()
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        return DeviceArray(src.t.view(src.t.offset, shape, strides))

    def __getitem__(self, key) -> "DeviceArray":
        """Basic indexing: integers and slices with a positive step (a view, no copy)."""
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices for an array of {self.ndim} dimensions")
        offset, shape, strides = self.t.offset, [], []
        for dim, (size, stride) in enumerate(zip(self.shape, self.t.strides)):
            k = key[dim] if dim < len(key) else slice(None)
            if isinstance(k, slice):
                start, stop, step = k.indices(size)
                if step < 1:
                    raise IndexError("DeviceArray slices need a positive step")
                n = max(0, (stop - start + step - 1) // step)
                offset += start * stride if n else 0
                shape.append(n)
                strides.append(stride * step)
            elif isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_)):
                i = int(k) + size if k < 0 else int(k)
                if not 0 <= i < size:
                    raise IndexError(f"index {k} is out of bounds for axis {dim} with size {size}")
                offset += i * stride
            else:
                raise IndexError(f"DeviceArray supports integers and slices as indices, not {type(k).__name__}")
        return DeviceArray(self.t.view(offset, shape, strides))

    def __setitem__(self, key, value) -> None:
        if isinstance(key, np.ndarray) and key.dtype == bool:
            # rows picked by a boolean mask over the leading dimensions: a scatter of whole rows
            if key.shape != self.shape[:key.ndim] or not self.t.contiguous:
                raise IndexError(f"boolean index {key.shape} must cover the leading dimensions of a contiguous "
                                 f"array {self.shape}")
            width = int(np.prod(self.shape[key.ndim:], dtype=np.int64))
            rows = np.flatnonzero(key).astype(np.int64)
            _C.cuda.scatter_rows(self.reshape(-1, width).t, rows, as_device(value).reshape(-1, width).t)
            return
        dst = self[key]
        src = as_device(value)
        if src.t.same_storage(dst.t):
            src = src.copy()  # a[1:] = a[:-1]: read everything before writing
        if src.shape != dst.shape:
            raise ValueError(f"cannot assign an array of shape {src.shape} to a slice of shape {dst.shape}")
        _C.cuda.copy(dst.t, src.t)

    # ---- arithmetic of the residual stream --------------------------------------------------
    def __add__(self, other) -> "DeviceArray":
        other = as_device(other)
        big, small = (self, other) if self.ndim >= other.ndim else (other, self)
        return DeviceArray(_C.cuda.add(big.contiguous().t, small.contiguous().t))

    __radd__ = __add__

    def __mul__(self, s) -> "DeviceArray":
        if not isinstance(s, numbers.Real):
            return NotImplemented  # only scaling by a number happens between ops
        return DeviceArray(_C.cuda.scale(self.contiguous().t, float(s)))

    __rmul__ = __mul__


# Within a forward pass: id(host array) -> (the array, its upload). The array is held, so its id
# cannot be reused by another during the pass; the model does not write into an array it has
# handed to an op in the same pass.
_pass_uploads: contextvars.ContextVar[dict | None] = contextvars.ContextVar("refpg_cuda_uploads", default=None)


def as_device(x) -> DeviceArray:
    """x itself when it is on the GPU, else a device copy of it (float32, uint16 bf16 bits, int64,
    bool); inside a forward pass, the copy made for the same host array earlier in the pass."""
    if isinstance(x, DeviceArray):
        return x
    uploads = _pass_uploads.get()
    if uploads is not None and id(x) in uploads:
        return uploads[id(x)][1]
    a = np.asarray(x)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    dev = DeviceArray(_C.cuda.upload(np.require(a, requirements="C")))  # keeps 0-d arrays 0-d
    if uploads is not None and isinstance(x, np.ndarray):
        uploads[id(x)] = (x, dev)
    return dev


def upload_weights(tree):
    """A copy of a weights dataclass tree (refpg.weights) with every array on the GPU, uploaded once
    (an array or matrix that appears twice — tied embeddings — is uploaded once and shared)."""
    done: dict[int, object] = {}

    def walk(node):
        if isinstance(node, (np.ndarray, Matrix)):
            if id(node) not in done:
                done[id(node)] = as_device(node) if isinstance(node, np.ndarray) else dataclasses.replace(
                    node, data=as_device(node.data), scales=node.scales and walk(node.scales),
                    biases=node.biases and walk(node.biases))
            return done[id(node)]
        if isinstance(node, list):
            return [walk(n) for n in node]
        if dataclasses.is_dataclass(node):
            return dataclasses.replace(node, **{f.name: walk(getattr(node, f.name)) for f in dataclasses.fields(node)})
        return node

    return walk(tree)


def synchronize() -> None:
    """Wait for the GPU (timing); raises the first asynchronous CUDA error."""
    _C.cuda.synchronize()


# ---- the ops (twins of refpg.ops): numpy inputs are uploaded, results stay on the GPU ------------

def _t(x):
    return as_device(x).contiguous().t


def linear(x, weight: Matrix, bias=None):
    x = as_device(x)
    K = x.shape[-1]
    b = None if bias is None else _t(bias)
    if weight.format is Format.AFFINE:
        y = _C.cuda.linear_affine(x.reshape(-1, K).t, *_affine(weight), b)  # [M, N]
    else:
        y = _C.cuda.linear(x.reshape(-1, K).t, _t(weight.data), b)  # [M, N]
    return DeviceArray(y).reshape(*x.shape[:-1], y.shape[-1])


def layer_norm(x, weight, bias, eps):
    return DeviceArray(_C.cuda.layer_norm(_t(x), _t(weight), _t(bias), eps))


def rms_norm(x, weight, eps):
    return DeviceArray(_C.cuda.rms_norm(_t(x), _t(weight), eps))


def gelu_tanh(x):
    return DeviceArray(_C.cuda.gelu_tanh(_t(x)))


def geglu(gate, up):
    return DeviceArray(_C.cuda.geglu(_t(gate), _t(up)))


def softcap(x, cap):
    return x if cap is None else DeviceArray(_C.cuda.softcap(_t(x), cap))


def rope(x, cos, sin):
    return DeviceArray(_C.cuda.rope(_t(x), _t(cos), _t(sin)))


def attention(q, k, v, mask, scale, logit_softcap=None):
    q, k, v = (as_device(a) for a in (q, k, v))  # k, v may be strided views of the cache
    m = None if mask is None else as_device(mask).t
    return DeviceArray(_C.cuda.attention(q.t, k.t, v.t, m, scale, logit_softcap))


def embedding(table: Matrix, ids):
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"embedding ids must be integers, got {ids.dtype}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if table.format is Format.AFFINE:
        return DeviceArray(_C.cuda.embedding_affine(*_affine(table), ids))
    return DeviceArray(_C.cuda.embedding(_t(table.data), ids))


def _affine(m: Matrix) -> tuple:
    """An AFFINE matrix as the binding takes it: codes, scales, biases, bits, group size."""
    return _t(m.data), _t(m.scales.data), _t(m.biases.data), m.bits, m.group_size


class CudaBackend(Backend):
    name = "cuda"
    ops = {} if _C is None else {op: globals()[op] for op in OP_NAMES}
    array_type = DeviceArray
    auto = False  # until its kernels have passed the op table on a GPU
    reads_bf16 = True
    formats = frozenset({Format.F32, Format.BF16, Format.AFFINE})
    # Its prefill matmul rounds activations (and fp32 weights) to bf16 for the tensor cores (NMSE
    # ~1e-6 expected); its decode GEMV stays exact fp32.
    # On AFFINE weights the same: every weight is dequantized exactly (csrc/cuda/affine.h).
    tolerance = {"linear": 2e-5, ("linear", Format.AFFINE): 2e-5}

    def unavailable(self) -> str | None:
        return unavailable_reason()

    def adopt(self, x):
        return x  # the op adapters upload host arrays themselves (once per pass)

    def zeros(self, shape) -> DeviceArray:
        return DeviceArray(_C.cuda.zeros(list(shape), np.float32))

    def prepare_weights(self, weights):
        return upload_weights(weights)  # once; they stay on the GPU

    @contextlib.contextmanager
    def forward_pass(self):
        if _pass_uploads.get() is not None:  # nested: the outer pass keeps its uploads
            yield
            return
        token = _pass_uploads.set({})
        try:
            yield
        finally:
            _pass_uploads.reset(token)


BACKEND = CudaBackend()
