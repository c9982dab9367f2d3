"""The `numpy` backend: the reference ops of refpg/ops.py, always available."""

from __future__ import annotations

from refpg import ops as reference
from refpg.backends.base import OP_NAMES, Backend


class NumPyBackend(Backend):
    name = "numpy"
    ops = {op: getattr(reference, op) for op in OP_NAMES}


BACKEND = NumPyBackend()
