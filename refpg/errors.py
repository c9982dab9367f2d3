"""What a user can get wrong, by kind: refpg's error classes, and the checks of API arguments.

Every class is a ValueError (BackendMismatch, check mode's verdict, an AssertionError) and its
message names what is at fault: the file, the config field, the tensor, the argument, the flag or
the environment variable. The CLI turns each into one line on stderr and exit code 2 (USER_ERRORS).
The modules that raise them re-export them (`refpg.config.ConfigError` is this ConfigError).
"""

from __future__ import annotations

import math
import numbers

import numpy as np


class ConfigError(ValueError):
    """config.json is missing, unreadable or describes a model refpg does not implement."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, malformed, or does not fit the model."""


class ProcessorError(ValueError):
    """An input the processor cannot use: an unreadable image, a missing tokenizer, mismatched lists."""


class InputError(ValueError):
    """Inputs the model cannot take: wrong shapes or dtypes, unknown ids, too long a sequence, an
    argument out of range."""


class BackendError(ValueError):
    """A backend selection names an unknown op or backend, or one that is not available here; or an
    environment variable that configures the backends (REFPG_BACKEND, REFPG_CHECK, REFPG_THREADS,
    REFPG_SIMD) holds a value refpg cannot use."""


class DumpError(ValueError):
    """An activation dump that is missing, unreadable, not in refpg's format, or of another run."""


class BackendMismatch(AssertionError):
    """Check mode: a backend's result differs from the NumPy reference beyond the op's tolerance."""


USER_ERRORS = (ConfigError, CheckpointError, ProcessorError, InputError, BackendError, DumpError,
               BackendMismatch, OSError)


def integer(value, name: str, lo: int = 0, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi] (bools and floats refused), else InputError naming `name`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InputError(f"{name} must be an integer {bounds}, got {value!r}")
    return int(value)


def number(value, name: str, lo: float = 0.0, above: bool = False, hi: float | None = None) -> float:
    """`value` as a finite float >= lo (> lo with above) and <= hi, else InputError naming `name`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value) \
        and (value > lo if above else value >= lo) and (hi is None or value <= hi)
    if not ok:
        bounds = f"{'>' if above else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
        raise InputError(f"{name} must be a finite number {bounds}, got {value!r}")
    return float(value)
