"""Weight formats: how a matrix's numbers are stored, and the one place the reference decodes them.

Linear weights and embedding tables travel as a `Matrix`: the stored data and its `Format`. Native
kernels read the stored data directly (bf16 at half the bytes of float32) and are told the format;
the NumPy reference decodes it to float32 in `to_float32`, the only function that knows what a
format's bits mean, and `encode` is its inverse (float32 -> a format, rounding as the format does).
A new format (a packed quantized one, with its scales) is a `Format` member, its arrays on
`Matrix`, and a branch in `encode`, `to_float32` and `Matrix.rows`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np


class Format(enum.Enum):
    F32 = "float32"  # IEEE float32 [rows, cols]
    BF16 = "bfloat16"  # bfloat16 bit patterns, as uint16 [rows, cols]


STORAGE_DTYPE = {Format.F32: np.dtype(np.float32), Format.BF16: np.dtype(np.uint16)}


@dataclass
class Matrix:
    """A weight matrix [rows, cols] as stored. `data` is a NumPy array, or a backend's device array
    (refpg.backends.cuda.DeviceArray) once the weights are prepared for that backend."""

    data: Any
    format: Format = Format.F32

    def __post_init__(self):
        if np.dtype(self.data.dtype) != STORAGE_DTYPE[self.format] or len(self.data.shape) != 2:
            raise TypeError(f"a {self.format.value} matrix is stored as a 2-d {STORAGE_DTYPE[self.format]} array, "
                            f"got {self.data.dtype} {list(self.data.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * STORAGE_DTYPE[self.format].itemsize

    def rows(self, ids: np.ndarray) -> "Matrix":
        """The rows at `ids` [n] as a [n, cols] matrix of the same format (an embedding lookup)."""
        return Matrix(self.data[ids], self.format)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: the 16 bits become the high half of the float."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded.astype(np.uint16))


def to_float32(m: Matrix) -> np.ndarray:
    """The matrix's values as float32 [rows, cols]: how the NumPy reference reads every format."""
    if m.format is Format.BF16:
        return bf16_to_f32(m.data)
    return np.asarray(m.data, dtype=np.float32)


def encode(x: np.ndarray, fmt: Format) -> Matrix:
    """float32 [rows, cols] -> a Matrix of format `fmt` (bf16: round to nearest even)."""
    x = np.asarray(x, dtype=np.float32)
    return Matrix(f32_to_bf16(x) if fmt is Format.BF16 else x, fmt)
