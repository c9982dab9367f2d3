"""Named activations: `tap("text.3.mlp_out", x)` hands x to a hook when one is set, else does nothing.

The names are stable and in forward order; the layerwise diff tool and the parity tests read them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

_hook: Callable[[str, np.ndarray], None] | None = None
_last = "(start)"


def tap(name: str, x: np.ndarray) -> np.ndarray:
    global _last
    _last = name  # where we are, for error messages (backend check mode)
    if _hook is not None:
        _hook(name, x)
    return x


def last_name() -> str:
    """The most recent activation named in this process."""
    return _last


@contextmanager
def capture(hook: Callable[[str, np.ndarray], None]) -> Iterator[None]:
    """Call hook(name, array) for every named activation computed inside the block."""
    global _hook
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous


@contextmanager
def record() -> Iterator[dict[str, np.ndarray]]:
    """Collect copies of every named activation into a dict (name -> array), in forward order."""
    acts: dict[str, np.ndarray] = {}
    with capture(lambda name, x: acts.__setitem__(name, np.array(x, copy=True))):
        yield acts
