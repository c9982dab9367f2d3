"""Read safetensors files with NumPy alone: memory-mapped, validated, bf16/f16 decoded without torch.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from refpg.errors import CheckpointError
from refpg.formats import bf16_to_f32




# dtype name -> (numpy dtype as stored, bytes per element)
_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; decoded by bf16_to_f32
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U32": np.dtype("<u4"),  # MLX's packed quantization codes
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _short(v) -> str:
    """A header value for an error message, cut to a readable length."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


class SafetensorsFile:
    """One .safetensors file: its validated header and lazily memory-mapped tensors."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated (file of {size} bytes has no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{path}: bad header length {n} for a file of {size} bytes "
                                          f"(truncated or not a safetensors file)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
        except RecursionError:
            raise CheckpointError(f"{path}: header is not a safetensors header (JSON nested too deeply)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise CheckpointError(f"{path}: __metadata__ is not a JSON object")
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {_short(info)}") from None
            # JSON allows floats, strings, booleans and negatives here; the format allows none of them
            if not all(_is_count(v) for v in (*shape, begin, end)):
                raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {_short(info)} "
                                      f"(shape and data_offsets must be non-negative integers)")
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {_short(dtype)}")
            nbytes = math.prod(shape) * _DTYPES[dtype].itemsize  # Python ints: no overflow
            if end - begin != nbytes:
                raise CheckpointError(f"{path}: tensor {name!r} ({dtype}{_short(list(shape))}) has data_offsets "
                                      f"[{begin}, {end}] that do not match its size of {nbytes} bytes")
            if end > data_len:
                raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} of the data but the file holds "
                                      f"only {data_len} (truncated file)")
            self.entries[name] = (dtype, shape, begin, end)
        # The format's rule: the tensors tile the data exactly, in offset order — no overlap, no hole,
        # nothing after the last one.
        covered = 0
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda e: (e[1][2], e[1][3])):
            if begin != covered:
                what = "overlaps the tensor before it" if begin < covered else f"leaves a hole of {begin - covered} bytes before it"
                raise CheckpointError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] {what} "
                                      f"(safetensors data must be tiled exactly)")
            covered = end
        if covered != data_len:
            raise CheckpointError(f"{path}: {data_len - covered} bytes after the last tensor's data "
                                  f"(safetensors data must be tiled exactly)")

    def keys(self):
        return self.entries.keys()

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (bf16 as uint16 bits), memory-mapped: no bytes are read until used."""
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return np.zeros(shape, _DTYPES[dtype])
        mapped = np.memmap(self.path, dtype=_DTYPES[dtype], mode="r", offset=self.data_start + begin, shape=shape)
        # the format does not promise alignment; the native kernels require it, so copy the rare misfit
        return mapped if mapped.flags.aligned else np.array(mapped)

    def float32(self, name: str) -> np.ndarray:
        """The tensor as float32; F32 stays a read-only memory map (no copy)."""
        dtype = self.entries[name][0]
        raw = self.raw(name)
        if dtype == "F32":
            return raw
        if dtype == "BF16":
            return bf16_to_f32(raw)
        if dtype in ("F16", "F64"):
            return raw.astype(np.float32)
        raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}, expected a floating-point weight")


def write_safetensors(path: str, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file: {name: (dtype name, array)}, the data tiled in name order."""
    header, blobs, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name in sorted(tensors):
        dtype, array = tensors[name]
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)
