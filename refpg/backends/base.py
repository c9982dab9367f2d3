"""What a backend is, as the dispatcher (refpg/backend.py) sees it.

A backend is an object: its name, whether it can run here (and why not), the ops it has, the kind
of array its kernels return, how a value from elsewhere is moved to it, how it allocates, and how
it prepares a model's weights. Each backend is one file in this folder; refpg/backends/__init__.py
lists them. The dispatcher asks them; it never names one.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Iterator

import numpy as np

from refpg.formats import Format, Matrix

# The ops the model calls through the dispatcher; each has its NumPy twin in refpg.ops.
OP_NAMES = ("linear", "layer_norm", "rms_norm", "gelu_tanh", "geglu", "softcap", "rope", "attention", "embedding")


def to_host(x):
    """x as NumPy: any backend's array (each implements __array__) copied to the host, a Matrix
    with its data on the host; NumPy arrays, numbers and None unchanged."""
    if isinstance(x, Matrix):
        return x if isinstance(x.data, np.ndarray) else Matrix(np.asarray(x.data), x.format)
    if x is None or isinstance(x, (np.ndarray, numbers.Number)) or not hasattr(x, "__array__"):
        return x
    return np.asarray(x)


class Backend:
    """Defaults fit a backend that computes on the host with NumPy arrays; a backend file overrides
    what differs."""

    name: str
    ops: dict[str, Callable] = {}  # op name -> kernel with its NumPy twin's signature (refpg.ops)
    array_type: type = np.ndarray  # what its kernels return
    auto: bool = True  # `auto` may pick it (in registry order) when it is available
    reads_bf16: bool = False  # its linear and embedding read bf16 matrices as stored: load keeps them so
    formats: frozenset[Format] = frozenset({Format.F32, Format.BF16})  # what its linear and embedding read
    # op, or (op, weight format) -> NMSE bound where it computes differently from NumPy (say why)
    tolerance: dict = {}

    def unavailable(self) -> str | None:
        """Why it cannot run here, or None."""
        return None

    def environment_error(self) -> str | None:
        """What is wrong with the environment variables that configure it, or None."""
        return None

    def adopt(self, x):
        """An op argument that may live in another backend's memory, moved where this one reads it
        (only selections that mix memories pay for this)."""
        return to_host(x)

    def zeros(self, shape: tuple[int, ...]):
        """float32 zeros in this backend's memory (the KV cache)."""
        return np.zeros(shape, np.float32)

    def prepare_weights(self, weights):
        """The loaded weights (refpg.weights dataclasses) made ready for its kernels."""
        return weights

    @contextlib.contextmanager
    def forward_pass(self) -> Iterator[None]:
        """Scope of one forward pass of the model (a backend may keep per-pass state in it)."""
        yield
