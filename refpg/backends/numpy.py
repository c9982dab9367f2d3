"""The `numpy` backend: the reference ops of refpg/ops.py, always available."""

from __future__ import annotations

from refpg import ops as reference
from refpg.backends.base import OP_NAMES, Backend
from refpg.formats import Format


class NumPyBackend(Backend):
    name = "numpy"
    ops = {op: getattr(reference, op) for op in OP_NAMES}
    formats = frozenset(Format)  # refpg.formats.to_float32 decodes every one


BACKEND = NumPyBackend()
