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


def load_reference(model_dir: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(model_dir, "reference.npz")) as z:
        return {k: z[k] for k in z.files}


def case_inputs(ref: dict, case: str) -> dict[str, np.ndarray]:
    prefix = f"{case}/input/"
    return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
