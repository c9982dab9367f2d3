"""The `cpp` backend: the native CPU kernels of refpg._C (csrc/cpu/), on NumPy arrays.

The kernels validate their arguments (csrc/bind_args.h) and read weights in their stored format
(float32 or bf16 bits). REFPG_THREADS (worker threads) and REFPG_SIMD (instruction set) configure
them once, when refpg is imported.
"""

from __future__ import annotations

import os

import numpy as np

from refpg.backends.base import OP_NAMES, Backend
from refpg.formats import Matrix

try:
    from refpg import _C
except ImportError as e:  # the NumPy reference works without the extension
    _C = None
    _IMPORT_ERROR = f"the native extension refpg._C is not importable ({e}); build it with `pip install .`"

MAX_THREADS = 1024  # REFPG_THREADS beyond this is a typo, not a machine


def linear(x: np.ndarray, weight: Matrix, bias=None) -> np.ndarray:
    K = x.shape[-1]
    y = _C.linear(np.ascontiguousarray(x).reshape(-1, K), weight.data, bias)  # [..., K] -> [M, N]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def embedding(table: Matrix, ids) -> np.ndarray:
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

    def __init__(self):
        self._env_error = configure_native() if _C is not None else None

    def unavailable(self) -> str | None:
        return _IMPORT_ERROR if _C is None else None

    def environment_error(self) -> str | None:
        return self._env_error


BACKEND = CppBackend()
