"""The CUDA kernels on a real GPU: argument checks, errors, memory bounds and whole-model parity.

The op table (tests/test_backend_ops.py) runs every op on `cuda` against NumPy; the data path
around the kernels is tested without a GPU in tests/test_cuda_plumbing.py. Everything here skips,
with the reason, where no GPU can be used — except the check that CI compiled the kernels — and
fails instead where REFPG_REQUIRE_CUDA=1 (tools/gpu_check.sh).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import case_inputs, load_reference, run_python

from refpg import PaliGemma, backend
from refpg.backends import cuda

F32 = np.float32
needs_gpu = pytest.mark.usefixtures("cuda_device")  # skips without a GPU; fails instead under REFPG_REQUIRE_CUDA=1
rng = np.random.default_rng(7)

def randn(*shape):
    return rng.standard_normal(shape).astype(F32)


def test_cuda_kernels_were_compiled_where_ci_requires_it():
    """CI sets REFPG_REQUIRE_CUDA_BUILD=1 (nvcc is there, a GPU is not): a kernel that does not
    compile fails the install; one the build silently left out fails here."""
    if not os.environ.get("REFPG_REQUIRE_CUDA_BUILD"):
        pytest.skip("REFPG_REQUIRE_CUDA_BUILD is not set (CI sets it)")
    from refpg import _C

    assert _C.cuda.compiled, cuda.unavailable_reason()


def test_cuda_reports_why_it_is_unavailable():
    reason = cuda.unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is available here")
    assert backend.UNAVAILABLE["cuda"] == reason
    with pytest.raises(backend.BackendError, match="cuda"):
        PaliGemma.from_pretrained("unused", backend="cuda")


@needs_gpu
@pytest.mark.parametrize("call,error,message", [
    (lambda C: C.linear(C.upload(randn(3, 4)), C.upload(randn(5, 6))), ValueError, "linear: weight"),
    (lambda C: C.linear(randn(3, 4), C.upload(randn(5, 4))), ValueError, "linear: x must be a refpg device tensor"),
    (lambda C: C.linear(C.upload(randn(3, 4).astype(np.int64)), C.upload(randn(5, 4))), ValueError, "linear: x"),
    (lambda C: C.linear(C.upload(randn(3, 4)), C.upload(randn(5, 4)), C.upload(randn(4))), ValueError, "linear: bias"),
    (lambda C: C.rms_norm(C.upload(randn(3, 4)), C.upload(randn(5)), 1e-6), ValueError, "rms_norm: weight"),
    (lambda C: C.geglu(C.upload(randn(3, 4)), C.upload(randn(3, 5))), ValueError, "geglu"),
    (lambda C: C.rope(C.upload(randn(1, 2, 3, 4)), C.upload(randn(1, 2, 5)), C.upload(randn(1, 2, 5))), ValueError, "rope"),
    (lambda C: C.attention(*(C.upload(randn(*s)) for s in [(1, 2, 3, 8), (1, 5, 2, 8), (1, 5, 2, 8)]),
                           C.upload(np.ones((1, 2, 5), bool)), 0.1), ValueError, "attention"),
    (lambda C: C.attention(*(C.upload(randn(*s)) for s in [(1, 2, 4, 8), (1, 5, 2, 8), (1, 5, 2, 8)]),
                           C.upload(np.ones((1, 2, 4), bool)), 0.1), ValueError, "attention: mask"),
    (lambda C: C.embedding(C.upload(randn(10, 4)), np.array([[3, 10]])), ValueError, "embedding"),
    (lambda C: C.upload(randn(4, 4)).view(0, [4, 5], [5, 1]), IndexError, "view reaches"),
    (lambda C: C.upload(randn(16)).view(0, [3], [2 ** 62]), IndexError, "view"),  # no int64 wrap-around
    (lambda C: C.copy(C.upload(randn(4)).view(0, [4], [0]), C.upload(randn(4))), ValueError, "zero stride"),
    (lambda C: C.scatter_rows(C.upload(randn(5, 3)), np.array([1, 1]), C.upload(randn(2, 3))), ValueError, "twice"),
    (lambda C: C.empty([1 << 42]), MemoryError, "CUDA out of memory"),
])
def test_bad_calls_raise_before_any_kernel_runs(call, error, message):
    from refpg import _C

    with pytest.raises(error, match=message):
        call(_C.cuda)
    _C.cuda.synchronize()  # and the device is still healthy


@needs_gpu
def test_kernels_read_only_inside_their_views():
    """NaN everywhere around the views: a kernel reading past a row or a cache slot returns NaN."""
    from refpg import _C

    w = cuda.as_device(randn(19, 33))
    for M in (7, 300):  # GEMV path, tensor-core path
        x_buf = np.full((M, 40), np.nan, F32)
        x_buf[:, 1:34] = randn(M, 33)
        x = cuda.as_device(x_buf)[:, 1:34]  # rows 40 floats apart, starting 4 bytes in: handed over as such
        y = _C.cuda.download(_C.cuda.linear(x.t, w.t))
        ref = x_buf[:, 1:34] @ np.asarray(w).T
        assert np.isfinite(y).all() and backend.nmse(y, ref) <= backend.tolerance("linear", "cuda")

    cache = np.full((2, 64, 2, 16), np.nan, F32)
    cache[:, :40] = randn(2, 40, 2, 16)
    k = cuda.as_device(cache)
    for T in (1, 9):  # decode kernel, prefill kernel
        q = randn(2, T, 4, 16)
        out = np.asarray(cuda.attention(q, k[:, :40], k[:, :40], np.ones((2, T, 40), bool), 0.25))
        ref = backend.OPS["attention"]["numpy"](q, cache[:, :40], cache[:, :40], np.ones((2, T, 40), bool), 0.25)
        assert backend.nmse(out, ref) <= backend.tolerance("attention", "cuda")


@needs_gpu
def test_cuda_check_mode_passes_on_a_whole_model(tiny_checkpoints):
    """Every op of a forward pass within its stated tolerance of NumPy (check mode raises otherwise)."""
    path = tiny_checkpoints["gemma2-bf16"]
    inputs = case_inputs(load_reference(path), "batch")
    model = PaliGemma.from_pretrained(path, backend="cuda", check=True)
    model.generate(inputs, max_new_tokens=3)


def test_require_cuda_turns_a_missing_gpu_into_failures_not_skips():
    """tools/gpu_check.sh sets REFPG_REQUIRE_CUDA=1: where cuda cannot run, the GPU tests must fail."""
    if "cuda" not in backend.UNAVAILABLE:
        pytest.skip("a GPU is available here: nothing would skip")
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "read_only_inside or M1-K7-N3-f32-cuda",
                       os.path.join(tests, "test_cuda.py"), os.path.join(tests, "test_backend_ops.py")],
                      cwd=tests, env={"REFPG_REQUIRE_CUDA": "1"})
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "REFPG_REQUIRE_CUDA is set, but the cuda backend is unavailable" in proc.stdout
    assert "1 failed" in proc.stdout and "1 error" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
