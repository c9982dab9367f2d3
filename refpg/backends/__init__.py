"""The backends, one file each (what a backend is: refpg/backends/base.py).

REGISTRY is every backend the dispatcher (refpg/backend.py) knows, in the order `auto` tries them.
A new backend is a file here and a line in REGISTRY.
"""

from __future__ import annotations

from refpg.backends import cpp, cuda, numpy

REGISTRY = (
    cpp.BACKEND,
    cuda.BACKEND,  # never picked by auto (CudaBackend.auto)
    numpy.BACKEND,
)
