"""Weight formats: how a matrix's numbers are stored, and the one place the reference decodes them.

Linear weights and embedding tables travel as a `Matrix`: the stored data and its `Format`. Native
kernels read the stored data directly (bf16 at half the bytes of float32, quantized codes at a
quarter or an eighth) and are told the format; the NumPy reference decodes it to float32 in
`to_float32`, the only function that knows what a format's bits mean. `encode` and `quantize` go
the other way (float32 -> a format, rounding as the format does).

Formats:
- F32, BF16 (bit patterns as uint16), F16: a value per element.
- AFFINE: MLX's affine group quantization, as mlx-community checkpoints store it. Each row is cut
  into groups of `group_size` (32, 64, 128) consecutive elements sharing a scale s and a bias b
  (F32, BF16 or F16, the model's dtype); an element is an unsigned `bits`-bit code q (2, 3, 4, 5, 6
  or 8 bits) and stands for q·s + b. The codes of a row form one bit stream, least significant bit
  first, read as little-endian uint32 words: [rows, cols·bits/32]. The arithmetic of q·s + b is
  MLX's, bit for bit: the product rounded to the scales' dtype, then the sum rounded to it again
  (tests/test_quantized.py holds it to mlx.core.dequantize and mlx.core.quantize).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np


class Format(enum.Enum):
    F32 = "float32"  # IEEE float32 [rows, cols]
    BF16 = "bfloat16"  # bfloat16 bit patterns, as uint16 [rows, cols]
    F16 = "float16"  # IEEE float16 [rows, cols] (the scales of an fp16 model's quantized matrices)
    AFFINE = "mlx-affine"  # MLX's affine group quantization (module docstring)


STORAGE_DTYPE = {Format.F32: np.dtype(np.float32), Format.BF16: np.dtype(np.uint16),
                 Format.F16: np.dtype(np.float16), Format.AFFINE: np.dtype(np.uint32)}
# safetensors dtype names of the per-element formats (a checkpoint's tensors, an affine matrix's scales)
SAFETENSORS_FORMATS = {"F32": Format.F32, "BF16": Format.BF16, "F16": Format.F16}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
QUANTIZE_CHUNK = 1 << 24  # elements quantize works on at once: temporaries of 64 MB, whatever the matrix


@dataclass
class Matrix:
    """A weight matrix [rows, cols] as stored. `data` is a NumPy array, or a backend's device array
    (refpg.backends.cuda.DeviceArray) once the weights are prepared for that backend. An AFFINE
    matrix also carries its code width, group size, and per-group scales and biases (each a Matrix
    [rows, cols / group_size] of F32, BF16 or F16)."""

    data: Any
    format: Format = Format.F32
    bits: int = 0
    group_size: int = 0
    scales: "Matrix | None" = None
    biases: "Matrix | None" = None

    def __post_init__(self):
        if np.dtype(self.data.dtype) != STORAGE_DTYPE[self.format] or len(self.data.shape) != 2:
            raise TypeError(f"a {self.format.value} matrix is stored as a 2-d {STORAGE_DTYPE[self.format]} array, "
                            f"got {self.data.dtype} {list(self.data.shape)}")
        if self.format is not Format.AFFINE:
            return
        if self.bits not in AFFINE_BITS or self.group_size not in AFFINE_GROUP_SIZES:
            raise ValueError(f"MLX affine quantization has bits {AFFINE_BITS} and group sizes {AFFINE_GROUP_SIZES}, "
                             f"got bits {self.bits}, group size {self.group_size}")
        rows, cols = self.shape
        want = (rows, cols // self.group_size)
        for name, part in (("scales", self.scales), ("biases", self.biases)):
            if not isinstance(part, Matrix) or part.format not in (Format.F32, Format.BF16, Format.F16) \
                    or part.shape != want or part.format is not self.scales.format:
                raise ValueError(f"an affine matrix {list(self.shape)} in groups of {self.group_size} needs {name} "
                                 f"{list(want)} of float32, bfloat16 or float16, as its scales")
        if cols % self.group_size:
            raise ValueError(f"{cols} columns do not split into groups of {self.group_size}")

    @property
    def shape(self) -> tuple[int, int]:
        """[rows, cols] of the values it stands for."""
        rows, stored = self.data.shape
        return (rows, stored * 32 // self.bits) if self.format is Format.AFFINE else (rows, stored)

    @property
    def nbytes(self) -> int:
        """Bytes as stored (codes, scales and biases for AFFINE)."""
        own = int(np.prod(self.data.shape)) * STORAGE_DTYPE[self.format].itemsize
        return own + (self.scales.nbytes + self.biases.nbytes if self.format is Format.AFFINE else 0)

    def rows(self, ids: np.ndarray) -> "Matrix":
        """The rows at `ids` [n] as a [n, cols] matrix of the same format (an embedding lookup)."""
        if self.format is Format.AFFINE:
            return Matrix(self.data[ids], self.format, self.bits, self.group_size,
                          self.scales.rows(ids), self.biases.rows(ids))
        return Matrix(self.data[ids], self.format)


def stored_format(dtype) -> Format:
    """The per-element format a NumPy storage dtype holds: float32 F32, uint16 BF16 bits, float16 F16."""
    for f in (Format.F32, Format.BF16, Format.F16):
        if STORAGE_DTYPE[f] == np.dtype(dtype):
            return f
    raise TypeError(f"{np.dtype(dtype)} stores no per-element weight format (float32, uint16 bf16 bits, float16)")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: the 16 bits become the high half of the float."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded.astype(np.uint16))


def round_to(x: np.ndarray, fmt: Format) -> np.ndarray:
    """float32 values rounded to the nearest value of `fmt` (F32, BF16, F16), as float32."""
    if fmt is Format.BF16:
        return bf16_to_f32(f32_to_bf16(x))
    if fmt is Format.F16:
        return x.astype(np.float16).astype(np.float32)
    return x


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """[rows, words] uint32 -> the [rows, words·32/bits] codes, least significant bits first."""
    rows, words = packed.shape
    packed = np.ascontiguousarray(packed, dtype="<u4")
    if 32 % bits == 0:  # 2, 4, 8 bits: whole codes per word
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        return ((packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)).reshape(rows, words * 32 // bits)
    stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")  # [rows, words·32] bits
    codes = stream.reshape(rows, words * 32 // bits, bits).astype(np.uint32)
    return codes @ (np.uint32(1) << np.arange(bits, dtype=np.uint32))


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] codes < 2^bits -> [rows, cols·bits/32] uint32, the inverse of unpack_codes."""
    rows, cols = codes.shape
    if 32 % bits == 0:  # 2, 4, 8 bits: whole codes per word
        per_word = codes.astype(np.uint32).reshape(rows, cols * bits // 32, 32 // bits)
        words = np.zeros(per_word.shape[:2], np.uint32)
        for i in range(32 // bits):
            words |= per_word[..., i] << np.uint32(i * bits)
        return words
    stream = ((codes[..., None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(rows, cols * bits), axis=-1, bitorder="little").view("<u4").astype(np.uint32)


def to_float32(m: Matrix) -> np.ndarray:
    """The matrix's values as float32 [rows, cols]: how the NumPy reference reads every format."""
    if m.format is Format.BF16:
        return bf16_to_f32(m.data)
    if m.format is Format.AFFINE:
        codes = unpack_codes(m.data, m.bits).astype(np.float32)  # [rows, cols]
        scales = np.repeat(to_float32(m.scales), m.group_size, axis=1)
        biases = np.repeat(to_float32(m.biases), m.group_size, axis=1)
        fmt = m.scales.format  # MLX computes in the scales' dtype: each operation rounds to it
        return round_to(round_to(codes * scales, fmt) + biases, fmt)
    return np.asarray(m.data, dtype=np.float32)


def encode(x: np.ndarray, fmt: Format) -> Matrix:
    """float32 [rows, cols] -> a Matrix of format F32, BF16 or F16 (rounding to nearest even)."""
    x = np.asarray(x, dtype=np.float32)
    if fmt is Format.BF16:
        return Matrix(f32_to_bf16(x), fmt)
    return Matrix(x.astype(STORAGE_DTYPE[fmt]), fmt)


def quantize(x: np.ndarray, bits: int, group_size: int, scale_format: Format = Format.F32) -> Matrix:
    """float32 [rows, cols] -> an AFFINE Matrix, exactly as mlx.core.quantize does on the CPU.

    x holds the values of the model's dtype (`scale_format`: the scales and biases are stored in it).
    Per group: the edge is whichever of min and max is larger in magnitude; the scale spans
    [min, max] in 2^bits - 1 steps and is then adjusted so the edge is an exact code (q0·s = edge,
    with bias = edge) unless the edge rounds to code 0 (then bias 0). Codes round to nearest even.
    All in float32, from the unrounded scale and bias; they are stored rounded to `scale_format`.
    """
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape
    if bits not in AFFINE_BITS or group_size not in AFFINE_GROUP_SIZES or cols % group_size:
        raise ValueError(f"MLX affine quantization needs bits in {AFFINE_BITS} and a group size in "
                         f"{AFFINE_GROUP_SIZES} dividing the {cols} columns; got bits {bits}, group size {group_size}")
    chunk = max(1, QUANTIZE_CHUNK // max(cols, 1))  # rows per pass
    parts = [_quantize_rows(x[r:r + chunk], bits, group_size) for r in range(0, rows, chunk)]
    if not parts:  # no rows
        parts = [(np.zeros((0, cols * bits // 32), np.uint32),) + (np.zeros((0, cols // group_size), np.float32),) * 2]
    codes, scale, bias = (np.concatenate(p) for p in zip(*parts))
    return Matrix(codes, Format.AFFINE, bits, group_size, encode(scale, scale_format), encode(bias, scale_format))


def _quantize_rows(x: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize's arithmetic on some rows: (packed codes, float32 scales, float32 biases)."""
    rows, cols = x.shape
    groups = x.reshape(rows, cols // group_size, group_size)
    n_bins = np.float32((1 << bits) - 1)
    w_max, w_min = groups.max(-1), groups.min(-1)
    below = np.abs(w_min) > np.abs(w_max)  # the edge is the minimum
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scale = np.where(below, scale, -scale)
    edge = np.where(below, w_min, w_max)
    q0 = np.rint(edge / scale)
    exact = q0 != 0
    scale = np.where(exact, edge / np.where(exact, q0, np.float32(1)), scale).astype(np.float32)
    bias = np.where(exact, edge, np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint((groups - bias[..., None]) / scale[..., None]), 0, n_bins).astype(np.uint32)
    return pack_codes(codes.reshape(rows, cols), bits), scale, bias
