"""Per-op backend registry: `OPS[op][backend] -> fn`, the NumPy reference always present.

The model calls ops by name through this module (`ops.linear(x, w)`); which implementation runs
is the active `Selection`, set by the model around each forward pass. Selections come from
`PaliGemma.from_pretrained(path, backend=...)`: one backend for every op (`"cpp"`), a mapping per
op (`{"matmul": "cpp", "attention": "numpy"}`), or the environment variable `REFPG_BACKEND`
(`"cpp"` or `"matmul=cpp,attention=numpy"`). `auto` takes the first available of `AUTO_ORDER`.

Check mode (`check=True` or `REFPG_CHECK=1`) runs the NumPy twin beside every non-NumPy op and
raises `BackendMismatch`, naming the op, where in the model it ran and the error, when they
disagree beyond the op's tolerance.

The `cuda` backend (refpg/cuda.py) keeps its data on the GPU as `DeviceArray`s. Per forward pass
the model hands its per-pass constants (RoPE tables, masks) to `place`, and its KV cache is made
by `zeros`: both put the data where the op reading it runs. A CPU op given a DeviceArray (a mixed
selection, or check mode) gets a host copy.
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from refpg import cuda, ops, tap
from refpg.errors import BackendError, BackendMismatch

OP_NAMES = ("linear", "layer_norm", "rms_norm", "gelu_tanh", "geglu", "softcap", "rope", "attention",
            "embedding")
ALIASES = {"matmul": "linear"}
AUTO_ORDER = ("cpp", "numpy")  # cuda joins once its kernels have passed the op table on a GPU

# Check-mode bound per op: normalized mean squared error NMSE = Σ(a−b)² / Σb² (ggml's metric).
# Both sides compute in float32 from the same inputs, so only summation order and libm differ —
# and, for cpp's linear on AMX CPUs, the split of each operand into two bf16 parts (NMSE ~1e-11,
# held to 1e-10 by tests/test_backend_ops.py).
TOLERANCE = {
    "linear": 5e-7, "attention": 5e-7, "layer_norm": 1e-7, "rms_norm": 1e-7, "gelu_tanh": 1e-7,
    "geglu": 1e-7, "softcap": 1e-7, "rope": 1e-7, "embedding": 0.0,
}
# Where a backend computes differently: cuda's prefill matmul rounds activations (and fp32 weights)
# to bf16 for the tensor cores (NMSE ~1e-6 expected); its decode GEMV stays exact fp32.
BACKEND_TOLERANCE = {("linear", "cuda"): 2e-5}


def tolerance(op: str, backend: str) -> float:
    """The check-mode / op-table bound on NMSE for `op` run by `backend` against NumPy."""
    return BACKEND_TOLERANCE.get((op, backend), TOLERANCE[op])


OPS: dict[str, dict[str, Callable]] = {name: {"numpy": getattr(ops, name)} for name in OP_NAMES}
UNAVAILABLE: dict[str, str] = {}  # backend -> why it cannot be used here

try:
    from refpg import _C
except ImportError as e:  # the NumPy reference works without the extension
    _C = None
    UNAVAILABLE["cpp"] = f"the native extension refpg._C is not importable ({e}); build it with `pip install .`"
_why_no_cuda = cuda.unavailable_reason()
if _why_no_cuda:
    UNAVAILABLE["cuda"] = _why_no_cuda


def _cpp_linear(x, weight, bias=None):
    K = x.shape[-1]
    y = _C.linear(np.ascontiguousarray(x).reshape(-1, K), weight, bias)  # [..., K] -> [M, N]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _register_cpp() -> None:
    adapters = {"linear": _cpp_linear}
    for name in OP_NAMES:
        if name in adapters and hasattr(_C, name):
            OPS[name]["cpp"] = adapters[name]
        elif hasattr(_C, name):
            OPS[name]["cpp"] = getattr(_C, name)


if _C is not None:
    _register_cpp()
    for _name in OP_NAMES:
        OPS[_name]["cuda"] = getattr(cuda, _name)




MAX_THREADS = 1024  # REFPG_THREADS beyond this is a typo, not a machine
_FLAG_VALUES = {"": False, "0": False, "false": False, "no": False, "off": False,
                "1": True, "true": True, "yes": True, "on": True}


def env_flag(name: str) -> bool:
    """A yes/no environment variable: unset, 0/1, false/true, no/yes, off/on (any case)."""
    value = os.environ.get(name, "")
    if value.strip().lower() not in _FLAG_VALUES:
        raise BackendError(f"environment variable {name}={value!r} is not a yes/no value (use 1 or 0)")
    return _FLAG_VALUES[value.strip().lower()]


def configure_native() -> str | None:
    """Apply REFPG_THREADS and check REFPG_SIMD, once, when refpg is imported; returns what is wrong
    with them (every Selection then raises it as a BackendError naming the variable), or None."""
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


NATIVE_ENV_ERROR = configure_native() if _C is not None else None




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


def parse_spec(spec: str | dict | None) -> dict[str, str]:
    """'cpp' | 'matmul=cpp,attention=numpy' | {'matmul': 'cpp'} | None -> {op: backend} for every op.

    Ops a mapping leaves out use `auto`. None reads REFPG_BACKEND, else `auto`.
    """
    if spec is None and os.environ.get("REFPG_BACKEND"):
        try:
            return parse_spec(os.environ["REFPG_BACKEND"])
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
        if be not in ("numpy", "cpp", "cuda", "auto"):
            raise BackendError(f"unknown backend {be!r} for {op}; choose numpy, cpp, cuda or auto")
        if be == "auto":
            chosen[op] = next(b for b in AUTO_ORDER if b in OPS[op] and b not in UNAVAILABLE)
        elif be in UNAVAILABLE:
            raise BackendError(f"backend {be!r} for {op} is unavailable: {UNAVAILABLE[be]}")
        elif be not in OPS[op]:
            raise BackendError(f"backend {be!r} has no {op} kernel")
    return chosen


@dataclass
class Selection:
    """Which backend runs each op, and whether each is checked against NumPy."""

    backends: dict[str, str]
    check: bool = False
    fns: dict[str, Callable] = field(init=False)
    uses_cuda: bool = field(init=False)

    def __post_init__(self):
        self.fns = {op: OPS[op][be] for op, be in self.backends.items()}
        self.uses_cuda = "cuda" in self.backends.values()

    @classmethod
    def from_spec(cls, spec: str | dict | None = None, check: bool | None = None) -> "Selection":
        if check is None:
            check = env_flag("REFPG_CHECK")
        if NATIVE_ENV_ERROR:
            raise BackendError(NATIVE_ENV_ERROR)
        return cls(parse_spec(spec), bool(check))

    def describe(self) -> str:
        kinds = sorted(set(self.backends.values()))
        if len(kinds) == 1:
            return kinds[0] + (" (checked)" if self.check else "")
        return ", ".join(f"{op}={be}" for op, be in self.backends.items()) + (" (checked)" if self.check else "")


NUMPY = Selection({op: "numpy" for op in OP_NAMES})
_active: contextvars.ContextVar[Selection] = contextvars.ContextVar("refpg_backend", default=NUMPY)


@contextmanager
def use(selection: Selection) -> Iterator[None]:
    """Run the ops inside the block with `selection`."""
    token = _active.set(selection)
    try:
        yield
    finally:
        _active.reset(token)


def _call(op: str, *args, **kwargs):
    sel = _active.get()
    be = sel.backends[op]
    if be != "cuda" and sel.uses_cuda:
        args = tuple(cuda.to_host(a) for a in args)  # a CPU op in a mixed selection: copy to the host
    out = sel.fns[op](*args, **kwargs)
    if sel.check and be != "numpy":
        ref = OPS[op]["numpy"](*(cuda.to_host(a) for a in args), **kwargs)
        got = cuda.to_host(out)
        where = f"{op} ({be}) after activation {tap.last_name()!r}"
        if got.shape != ref.shape:
            raise BackendMismatch(f"{where}: shape {got.shape}, numpy gives {ref.shape}")
        if (np.isfinite(got) != np.isfinite(ref)).any():  # NaN/Inf mismatches fail before any error is measured
            raise BackendMismatch(f"{where}: NaN/Inf where numpy has a finite value, or the reverse")
        err = nmse(got, ref)
        if err > tolerance(op, be):
            raise BackendMismatch(f"{where} differs from numpy: NMSE {err:.2e} > {tolerance(op, be):.0e}")
    return out


def place(x: np.ndarray, op: str):
    """A per-forward-pass constant (RoPE table, mask) put where `op`'s kernel reads it: on the GPU
    when `op` runs on cuda (one upload per pass, not per call), else x itself."""
    return cuda.as_device(x) if _active.get().backends[op] == "cuda" else x


def zeros(shape: tuple[int, ...], op: str):
    """float32 zeros where `op`'s kernel reads them (the KV cache, read by attention)."""
    return cuda.zeros(shape) if _active.get().backends[op] == "cuda" else np.zeros(shape, np.float32)


# The ops, by name, as the model calls them.
def linear(x, weight, bias=None):
    return _call("linear", x, weight, bias)


def layer_norm(x, weight, bias, eps):
    return _call("layer_norm", x, weight, bias, eps)


def rms_norm(x, weight, eps):
    return _call("rms_norm", x, weight, eps)


def gelu_tanh(x):
    return _call("gelu_tanh", x)


def geglu(gate, up):
    return _call("geglu", gate, up)


def softcap(x, cap):
    return x if cap is None else _call("softcap", x, cap)


def rope(x, cos, sin):
    return _call("rope", x, cos, sin)


def attention(q, k, v, mask, scale, logit_softcap=None):
    return _call("attention", q, k, v, mask, scale, logit_softcap)


def embedding(table, ids):
    return _call("embedding", table, ids)
