"""The real refpg._C.cuda bindings, on any machine that compiled them — GPU or not.

tests/fake_cuda.py stands in for _C.cuda with Python objects, so it cannot see a binding that fails
to convert its arguments (a shape list into std::vector, a std::vector back into a tuple). These
tests call the compiled bindings themselves: tensors of zero bytes need no device (allocating
nothing, launching nothing), so shapes, strides, views, every op's argument conversion and every
argument check run here; anything that does need memory raises _C.cuda.CudaError where no GPU is.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpg import backend, ops
from refpg.backends import cuda
from refpg.formats import STORAGE_DTYPE, Format, Matrix

F32 = np.float32

try:
    from refpg import _C
except ImportError:
    _C = None
pytestmark = pytest.mark.skipif(_C is None or not _C.cuda.compiled,
                                reason="refpg._C was built without its CUDA kernels (or not at all)")


def no_device() -> bool:
    return _C.cuda.device_count() == 0


@pytest.mark.parametrize("call", [
    lambda C: C.zeros([4]),
    lambda C: C.empty([2, 3]),
    lambda C: C.empty((2, 3), np.int64),
    lambda C: C.zeros([]),  # 0-d: one element
    lambda C: C.upload(np.ones(3, F32)),
])
def test_shapes_convert_so_allocating_without_a_device_is_a_cuda_error(call):
    """Before <pybind11/stl.h>, every one of these was a TypeError at argument conversion."""
    if not no_device():
        assert call(_C.cuda).dtype in (np.float32, np.int64)
        return
    with pytest.raises(_C.cuda.CudaError, match="CUDA error in"):
        call(_C.cuda)


def test_zero_byte_tensors_need_no_device_and_report_shape_strides_and_views():
    t = _C.cuda.empty([0, 4])
    assert t.shape == (0, 4) and t.strides == (4, 1) and t.offset == 0
    assert t.dtype == np.float32 and t.contiguous
    v = t.view(0, [0, 2], [2, 1])
    assert v.shape == (0, 2) and v.strides == (2, 1) and v.same_storage(t)
    assert t.view(0, (3, 0), (7, 1)).shape == (3, 0)
    assert t.view(9, [0], [1]).offset == 0  # an empty view may start anywhere: it reads nothing
    with pytest.raises(IndexError, match="view reaches element 0 of a storage of 0"):
        t.view(0, [1], [1])
    with pytest.raises(IndexError, match="view"):
        t.view(0, [0, 2], [1])  # ranks differ
    z = _C.cuda.zeros((3, 0), np.int64)
    assert z.shape == (3, 0) and z.strides == (0, 1) and z.dtype == np.int64
    u = _C.cuda.upload(np.zeros((2, 0, 5), np.uint16))
    assert u.shape == (2, 0, 5) and u.dtype == np.uint16
    host = _C.cuda.download(u)
    assert host.shape == (2, 0, 5) and host.dtype == np.uint16


def test_device_arrays_of_zero_bytes_view_reshape_copy_and_add_like_numpy():
    host = np.zeros((0, 3, 4), F32)
    a = cuda.as_device(host)
    assert a.shape == (0, 3, 4) and a.ndim == 3 and a.size == 0 and a.dtype == np.float32
    assert a.reshape(-1, 4).shape == host.reshape(-1, 4).shape
    assert a.reshape(3, 0, 4).shape == (3, 0, 4)
    for key in [(slice(None), slice(1, None)), (Ellipsis, 2), (slice(None), 0, slice(None, None, 2))]:
        assert a[key].shape == host[key].shape, key
    assert a.copy().shape == (0, 3, 4)
    assert (a + a).shape == (0, 3, 4)
    assert (a * 2.0).shape == (0, 3, 4)
    a[:, 1:] = np.zeros((0, 2, 4), F32)
    assert np.asarray(a).shape == (0, 3, 4)


def empty_args(op):
    """Arguments of zero bytes for `op` (every input has a zero dimension)."""
    z = lambda *s, dtype=F32: np.zeros(s, dtype)  # noqa: E731
    return {
        "linear": (z(0, 0), Matrix(z(3, 0))),          # M = 0, K = 0
        "layer_norm": (z(0, 0), z(0), z(0), 1e-6),
        "rms_norm": (z(2, 0), z(0), 1e-6),
        "gelu_tanh": (z(0, 7),),
        "geglu": (z(4, 0), z(4, 0)),
        "softcap": (z(0, 3), 30.0),
        "rope": (z(0, 2, 3, 4), z(0, 2, 4), z(0, 2, 4)),
        "attention": (z(0, 2, 4, 8), z(0, 5, 2, 8), z(0, 5, 2, 8), z(0, 2, 5, dtype=bool), 0.3),
        "embedding": (Matrix(z(6, 0)), z(0, dtype=np.int64)),
        # MLX's affine quantization: no x rows and no W rows (M = N = 0); no table rows and no ids
        "linear-affine": (z(0, 64), affine(0, 64, Format.F16)),
        "embedding-affine": (affine(0, 64, Format.BF16), z(0, dtype=np.int64)),
    }[op]


def affine(rows, cols, fmt) -> Matrix:
    """A 4-bit matrix in groups of 32, of zero bytes when rows = 0."""
    scales = Matrix(np.zeros((rows, cols // 32), np.dtype(STORAGE_DTYPE[fmt])), fmt)
    return Matrix(np.zeros((rows, cols // 8), np.uint32), Format.AFFINE, 4, 32, scales, scales)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the twins' norms over D = 0
@pytest.mark.parametrize("op", backend.OP_NAMES + ("linear-affine", "embedding-affine"))
def test_every_cuda_op_converts_its_arguments_and_returns_the_twins_shape(op):
    args = empty_args(op)
    out = getattr(cuda, op.split("-")[0])(*args)
    ref = getattr(ops, op.split("-")[0])(*args)
    assert isinstance(out, cuda.DeviceArray) and out.shape == ref.shape
    host = np.asarray(out)
    assert host.shape == ref.shape and host.dtype == np.float32


def e(*shape, dtype=F32):
    return _C.cuda.empty(list(shape), dtype)


@pytest.mark.parametrize("call,error,message", [
    (lambda C: C.linear(e(0, 4), e(0, 5)), ValueError, "linear: weight has shape"),
    (lambda C: C.linear(np.zeros((0, 4), F32), e(0, 4)), ValueError, "linear: x must be a refpg device tensor"),
    (lambda C: C.linear(e(0, 4, dtype=np.int64), e(0, 4)), ValueError, "linear: x has the wrong dtype"),
    (lambda C: C.linear(e(0, 4), e(0, 4), e(0, 0)), ValueError, "linear: bias must have 1 dimensions"),
    (lambda C: C.linear(e(0, 4), e(0, 4).view(0, [0, 4], [1, 0])), ValueError, "linear: weight must be contiguous"),
    (lambda C: C.rms_norm(e(0, 4), e(0), 1e-6), ValueError, "rms_norm: weight"),
    (lambda C: C.layer_norm(e(0, 0), e(0), e(0, 0), 1e-6), ValueError, "layer_norm: bias"),
    (lambda C: C.rms_norm(e(0, 0), e(0), float("nan")), ValueError, "rms_norm: eps must be a finite"),
    (lambda C: C.layer_norm(e(0, 0), e(0), e(0), "1e-6"), TypeError, "layer_norm: eps must be a number"),
    (lambda C: C.attention(e(0, 2, 2, 8), e(0, 5, 2, 8), e(0, 5, 2, 8), None, float("nan")), ValueError,
     "attention: scale must be a finite"),
    (lambda C: C.geglu(e(0, 4), e(0, 5)), ValueError, "geglu: gate"),
    (lambda C: C.softcap(e(0, 4), float("inf")), ValueError, "softcap: cap must be a finite float32"),
    (lambda C: C.softcap(e(0, 4), 1e39), ValueError, "softcap: cap must be a finite float32"),
    (lambda C: C.softcap(e(0, 4), "30"), TypeError, "softcap: cap must be a number"),
    (lambda C: C.rope(e(0, 2, 3, 5), e(0, 2, 5), e(0, 2, 5)), ValueError, "rope: x has shape .* head_dim must be even"),
    (lambda C: C.rope(e(0, 2, 3, 4), e(0, 2, 5), e(0, 2, 4)), ValueError, "rope: cos"),
    (lambda C: C.attention(e(0, 2, 3, 8), e(0, 5, 2, 8), e(0, 5, 2, 8), None, 0.1), ValueError,
     "attention: q's heads must be a multiple"),
    (lambda C: C.attention(e(0, 2, 4, 8), e(0, 5, 2, 8), e(0, 5, 2, 8), e(0, 2, 4, dtype=bool), 0.1), ValueError,
     "attention: mask"),
    (lambda C: C.attention(e(0, 2, 4, 8), e(0, 0, 2, 8), e(0, 0, 2, 8), None, 0.1), ValueError, "attention: k and v hold no keys"),
    (lambda C: C.attention(e(0, 2, 2, 600), e(0, 5, 2, 600), e(0, 5, 2, 600), None, 0.1), ValueError, "head_dim"),
    (lambda C: C.embedding(e(6, 0), np.array([3, 6])), ValueError, "embedding: ids holds 6"),
    (lambda C: C.embedding(e(6, 0), np.array([0.5])), ValueError, "embedding: ids must be int64"),
    (lambda C: C.scatter_rows(e(5, 0), np.array([1, 1]), e(2, 0)), ValueError, "scatter_rows: ids holds a row twice"),
    (lambda C: C.copy(e(0, 3), e(0, 4)), ValueError, "copy: dst .* differ"),
    (lambda C: C.copy(e(0, 3), np.zeros((0, 3), F32)), ValueError, "copy: src must be a refpg device tensor"),
    (lambda C: C.empty([2, -1]), ValueError, "negative dimension"),
    (lambda C: C.empty([2 ** 40, 2 ** 10]), ValueError, "more than 2\\^47 elements"),
    (lambda C: C.empty([2], np.float64), TypeError, "device tensors hold float32"),
    (lambda C: C.upload(np.zeros((0, 2), np.float64)), TypeError, "device tensors hold float32"),
    (lambda C: C.empty([0]).view(0, [3], [2 ** 62]), IndexError, "view"),
    (lambda C: C.empty([0]).view(-1, [0], [1]), IndexError, "offset outside the storage"),
    (lambda C: C.empty("abc"), TypeError, r"empty\(\): incompatible function arguments"),  # a str is no shape
])
def test_bad_calls_to_the_compiled_bindings_raise_before_any_device_work(call, error, message):
    with pytest.raises(error, match=message):
        call(_C.cuda)
