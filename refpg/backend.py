"""Selection, dispatch and check mode: which backend runs each op, and `OPS[op][backend] -> fn`.

The model calls ops by name through this module (`linear(x, w)`); which implementation runs is
the active `Selection`, set by the model around each forward pass. Selections come from
`PaliGemma.from_pretrained(path, backend=...)`: one backend for every op (`"cpp"`), a mapping per
op (`{"matmul": "cpp", "attention": "numpy"}`), or the environment variable `REFPG_BACKEND`
(`"cpp"` or `"matmul=cpp,attention=numpy"`). `auto` takes the first available backend of the
registry (refpg/backends/__init__.py) that allows it.

Check mode (`check=True` or `REFPG_CHECK=1`) runs the NumPy twin beside every non-NumPy op and
raises `BackendMismatch`, naming the op, where in the model it ran and the error, when they
disagree beyond the op's tolerance.

The backends are objects (refpg/backends/): this module asks them whether they run here, for
their ops, to move an argument from another backend's memory (a mixed selection), for zeros (the
KV cache) and to prepare weights. It names none of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from refpg import ops as reference
from refpg import tap
from refpg.backends import REGISTRY
from refpg.backends.base import OP_NAMES, Backend, to_host
from refpg.errors import BackendError, BackendMismatch
from refpg.formats import Format, Matrix

ALIASES = {"matmul": "linear"}
WEIGHT_OPS = ("linear", "embedding")  # the ops that read weight matrices (refpg.formats.Matrix)
REFERENCE = "numpy"  # the backend of refpg/ops.py: what check mode compares every other against
BACKENDS: dict[str, Backend] = {b.name: b for b in REGISTRY}

# Check-mode bound per op: normalized mean squared error NMSE = Σ(a−b)² / Σb² (ggml's metric).
# Both sides compute in float32 from the same inputs, so only summation order and libm differ —
# and, for cpp's linear on AMX CPUs, the split of each operand into two bf16 parts (NMSE ~1e-11,
# held to 1e-10 by tests/test_backend_ops.py). A backend that computes differently states its own
# bound (Backend.tolerance, with the reason).
TOLERANCE = {
    "linear": 5e-7, "attention": 5e-7, "layer_norm": 1e-7, "rms_norm": 1e-7, "gelu_tanh": 1e-7,
    "geglu": 1e-7, "softcap": 1e-7, "rope": 1e-7, "embedding": 0.0,
}


def tolerance(op: str, backend: str, weight_format: Format | None = None) -> float:
    """The check-mode / op-table bound on NMSE for `op` run by `backend` against NumPy (on weights
    of `weight_format`, for the ops that read them)."""
    own = BACKENDS[backend].tolerance
    return own.get((op, weight_format), own.get(op, TOLERANCE[op]))


OPS: dict[str, dict[str, Callable]] = {op: {b.name: b.ops[op] for b in REGISTRY if op in b.ops} for op in OP_NAMES}
UNAVAILABLE: dict[str, str] = {b.name: why for b in REGISTRY if (why := b.unavailable())}  # backend -> why not here

_FLAG_VALUES = {"": False, "0": False, "false": False, "no": False, "off": False,
                "1": True, "true": True, "yes": True, "on": True}


def env_flag(name: str) -> bool:
    """A yes/no environment variable: unset, 0/1, false/true, no/yes, off/on (any case)."""
    value = os.environ.get(name, "")
    if value.strip().lower() not in _FLAG_VALUES:
        raise BackendError(f"environment variable {name}={value!r} is not a yes/no value (use 1 or 0)")
    return _FLAG_VALUES[value.strip().lower()]


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    """Normalized mean squared error Σ(a−ref)² / Σref² (0 when both are all zeros)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    denom = float((ref * ref).sum())
    err = float(((a - ref) ** 2).sum())
    return err / denom if denom else err


def available(backend: str) -> list[str]:
    """The ops `backend` implements here (empty when it is unavailable)."""
    if backend in UNAVAILABLE:
        return []
    return [op for op in OP_NAMES if backend in OPS[op]]


def parse_spec(spec: str | dict | None, formats: frozenset[Format] = frozenset()) -> dict[str, str]:
    """'cpp' | 'matmul=cpp,attention=numpy' | {'matmul': 'cpp'} | None -> {op: backend} for every op.

    Ops a mapping leaves out use `auto`. None reads REFPG_BACKEND, else `auto`. `formats`: weight
    formats beyond float32 and bf16 the model's matrices come in (a quantized checkpoint); the
    ops that read weights go to a backend that reads them (auto picks one, a named one that cannot
    is an error).
    """
    if spec is None and os.environ.get("REFPG_BACKEND"):
        try:
            return parse_spec(os.environ["REFPG_BACKEND"], formats)
        except BackendError as e:
            raise BackendError(f"environment variable REFPG_BACKEND={os.environ['REFPG_BACKEND']!r}: {e}") from None
    if spec is None:
        spec = "auto"
    if isinstance(spec, str):
        if "=" in spec:
            pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise BackendError(f"backend selection {spec!r}: write one backend for all ops (cpp) "
                                   f"or op=backend pairs separated by commas (matmul=cpp,attention=numpy)")
            spec = {op.strip(): be.strip() for op, be in pairs}
        else:
            spec = {op: spec.strip() for op in OP_NAMES}
    if not isinstance(spec, dict):
        raise BackendError(f"backend selection must be a string or a dict {{op: backend}}, got {type(spec).__name__}")
    chosen = {op: "auto" for op in OP_NAMES}
    for op, be in spec.items():
        op = ALIASES.get(op, op)
        if op not in OPS:
            raise BackendError(f"unknown op {op!r} in backend selection; ops are {', '.join(OP_NAMES)} (matmul = linear)")
        chosen[op] = be
    for op, be in chosen.items():
        if be != "auto" and be not in BACKENDS:
            raise BackendError(f"unknown backend {be!r} for {op}; choose {', '.join(BACKENDS)} or auto")
        needs = formats if op in WEIGHT_OPS else frozenset()
        if be == "auto":
            chosen[op] = next(b.name for b in REGISTRY if b.auto and op in b.ops and b.name not in UNAVAILABLE
                              and needs <= b.formats)
        elif be in UNAVAILABLE:
            raise BackendError(f"backend {be!r} for {op} is unavailable: {UNAVAILABLE[be]}")
        elif be not in OPS[op]:
            raise BackendError(f"backend {be!r} has no {op} kernel")
        elif not needs <= BACKENDS[be].formats:
            lacking = ", ".join(sorted(f.value for f in needs - BACKENDS[be].formats))
            raise BackendError(f"backend {be!r} cannot read {lacking} weights in {op} (no kernel for them yet); "
                               f"select numpy or auto for {op}")
    return chosen


@dataclass
class Selection:
    """Which backend runs each op, and whether each is checked against NumPy."""

    backends: dict[str, str]  # op -> backend name
    check: bool = False
    fns: dict[str, Callable] = field(init=False)  # op -> the kernel that runs it
    runs: dict[str, Backend] = field(init=False)  # op -> the backend that runs it
    mixed: bool = field(init=False)  # its backends keep data in different memories: arguments move

    def __post_init__(self):
        self.fns = {op: OPS[op][be] for op, be in self.backends.items()}
        self.runs = {op: BACKENDS[be] for op, be in self.backends.items()}
        self.mixed = len({b.array_type for b in self.runs.values()}) > 1

    @classmethod
    def from_spec(cls, spec: str | dict | None = None, check: bool | None = None,
                  formats: frozenset[Format] = frozenset()) -> "Selection":
        if check is None:
            check = env_flag("REFPG_CHECK")
        for b in REGISTRY:  # a misconfigured environment is an error whatever is selected
            if b.environment_error():
                raise BackendError(b.environment_error())
        return cls(parse_spec(spec, formats), bool(check))

    @property
    def reads_bf16(self) -> bool:
        """Whether the weights' main reader (linear) reads bf16 matrices as stored."""
        return self.runs["linear"].reads_bf16

    def prepare_weights(self, weights):
        """The loaded weights made ready by the backend of their main reader (linear), e.g. uploaded to a GPU."""
        return self.runs["linear"].prepare_weights(weights)

    def describe(self) -> str:
        kinds = sorted(set(self.backends.values()))
        if len(kinds) == 1:
            return kinds[0] + (" (checked)" if self.check else "")
        return ", ".join(f"{op}={be}" for op, be in self.backends.items()) + (" (checked)" if self.check else "")


NUMPY = Selection({op: REFERENCE for op in OP_NAMES})
_active: contextvars.ContextVar[Selection] = contextvars.ContextVar("refpg_backend", default=NUMPY)


@contextlib.contextmanager
def use(selection: Selection) -> Iterator[None]:
    """Run the ops inside the block with `selection`: one forward pass for its backends."""
    token = _active.set(selection)
    try:
        with contextlib.ExitStack() as passes:
            for b in {id(b): b for b in selection.runs.values()}.values():
                passes.enter_context(b.forward_pass())
            yield
    finally:
        _active.reset(token)


def _call(op: str, *args, **kwargs):
    sel = _active.get()
    be = sel.runs[op]
    if sel.mixed:  # arguments may live in another backend's memory
        args = tuple(be.adopt(a) for a in args)
    out = sel.fns[op](*args, **kwargs)
    if sel.check and be.name != REFERENCE:
        ref = OPS[op][REFERENCE](*(to_host(a) for a in args), **kwargs)
        got = to_host(out)
        where = f"{op} ({be.name}) after activation {tap.last_name()!r}"
        if got.shape != ref.shape:
            raise BackendMismatch(f"{where}: shape {got.shape}, numpy gives {ref.shape}")
        if (np.isfinite(got) != np.isfinite(ref)).any():  # NaN/Inf mismatches fail before any error is measured
            raise BackendMismatch(f"{where}: NaN/Inf where numpy has a finite value, or the reverse")
        err, tol = nmse(got, ref), tolerance(op, be.name, weight_format(args))
        if err > tol:
            raise BackendMismatch(f"{where} differs from numpy: NMSE {err:.2e} > {tol:.0e}")
    return out


def weight_format(args) -> Format | None:
    """The format of the weight matrix among an op's arguments, if it has one."""
    return next((a.format for a in args if isinstance(a, Matrix)), None)


def zeros_beside(x, shape: tuple[int, ...]):
    """float32 zeros [shape] in the memory `x` lives in: the KV cache, beside the keys it will hold."""
    return next(b for b in REGISTRY if isinstance(x, b.array_type)).zeros(shape)


def _dispatched(op: str) -> Callable:
    """What the model calls for `op`: its NumPy twin's signature and docstring, the selected kernel."""
    @functools.wraps(getattr(reference, op))
    def call(*args, **kwargs):
        return _call(op, *args, **kwargs)
    return call


# The ops as the model calls them (signatures: refpg/ops.py), in the order of OP_NAMES.
linear, layer_norm, rms_norm, gelu_tanh, geglu, softcap, rope, attention, embedding = map(_dispatched, OP_NAMES)
