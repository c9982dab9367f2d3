"""The `cpp` backend: the native CPU kernels of refpg._C (csrc/cpu/), on NumPy arrays.

The kernels validate their arguments (csrc/bind_args.h) and read weights in their stored format
(float32 or bf16 bits). REFPG_THREADS (worker threads) and REFPG_SIMD (instruction set) configure
them once, when refpg is imported.
"""

from __future__ import annotations

import os

import numpy as np

from refpg.backends.base import OP_NAMES, Backend
from refpg.formats import Format, Matrix

try:
    from refpg import _C
except ImportError as e:  # the NumPy reference works without the extension
    _C = None
    _IMPORT_ERROR = f"the native extension refpg._C is not importable ({e}); build it with `pip install .`"

MAX_THREADS = 1024  # REFPG_THREADS beyond this is a typo, not a machine


def linear(x: np.ndarray, weight: Matrix, bias=None) -> np.ndarray:
    K = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, K)  # [..., K] -> [M, K]
    if weight.format is Format.AFFINE:
        y = _C.linear_affine(x2, weight.data, weight.scales.data, weight.biases.data, weight.bits, weight.group_size,
                             bias)
    else:
        y = _C.linear(x2, weight.data, bias)  # [M, N]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def embedding(table: Matrix, ids) -> np.ndarray:
    if table.format is Format.AFFINE:
        return _C.embedding_affine(table.data, table.scales.data, table.biases.data, table.bits, table.group_size,
                                   ids)
    return _C.embedding(table.data, ids)


def configure_native() -> str | None:
    """Apply REFPG_THREADS and check REFPG_SIMD, once; returns what is wrong with them, or None."""
    threads = os.environ.get("REFPG_THREADS", "").strip()
    if threads:
        if not (threads.isascii() and threads.isdigit() and 1 <= int(threads) <= MAX_THREADS):
            return (f"environment variable REFPG_THREADS={threads!r} must be a whole number of threads "
                    f"from 1 to {MAX_THREADS}")
        _C.set_num_threads(int(threads))
    try:
        _C.simd_path()  # reads REFPG_SIMD: unknown, or a path this CPU lacks
    except ValueError as e:
        return f"environment variable {e}"
    return None


class CppBackend(Backend):
    name = "cpp"
    ops = {} if _C is None else {op: globals().get(op) or getattr(_C, op) for op in OP_NAMES}
    reads_bf16 = True
    formats = frozenset({Format.F32, Format.BF16, Format.AFFINE})
    # linear's decode GEMV on an AFFINE matrix sums s·Σx·q + b·Σx per group, as MLX's own qmv kernel
    # does, skipping the rounding of each weight to the scales' dtype (refpg.formats): with bf16
    # scales that moves the result by up to ~5e-5 NMSE (measured); its integer loops round x to
    # 16-bit fixed point per group first (~1e-9 NMSE); see csrc/cpu/affine.h
    tolerance = {("linear", Format.AFFINE): 2e-4}

    def __init__(self):
        self._env_error = configure_native() if _C is not None else None

    def unavailable(self) -> str | None:
        return _IMPORT_ERROR if _C is None else None

    def environment_error(self) -> str | None:
        return self._env_error


BACKEND = CppBackend()
