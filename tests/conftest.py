"""Shared fixtures: tiny random PaliGemma checkpoints written by tools/make_tiny_checkpoint.py,
each with the activations transformers computes on it (reference.npz)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{variant: directory} for every variant of the tool (needs torch + transformers)."""
    pytest.importorskip("torch", reason="tiny checkpoints are written with torch + transformers")
    pytest.importorskip("transformers", reason="tiny checkpoints are written with torch + transformers")
    from make_tiny_checkpoint import VARIANTS, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_checkpoint(str(root / name), name) for name in VARIANTS}


def require_cuda_or_skip() -> None:
    """For tests that need a usable GPU: skips where there is none, saying why — or fails where
    REFPG_REQUIRE_CUDA=1 (tools/gpu_check.sh sets it: on a GPU machine, a CUDA build that is missing
    or cannot reach the device must fail the check, not skip it)."""
    from refpg import backend

    reason = backend.UNAVAILABLE.get("cuda")
    if reason and os.environ.get("REFPG_REQUIRE_CUDA"):
        pytest.fail(f"REFPG_REQUIRE_CUDA is set, but the cuda backend is unavailable: {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def cuda_device():
    """A test using it runs only where the cuda backend is available (see require_cuda_or_skip)."""
    require_cuda_or_skip()


def load_reference(model_dir: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(model_dir, "reference.npz")) as z:
        return {k: z[k] for k in z.files}


def case_inputs(ref: dict, case: str) -> dict[str, np.ndarray]:
    prefix = f"{case}/input/"
    return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
