"""Adapters: one small interface between the conformance suite and an implementation of PaliGemma.

An adapter is given a case's checkpoint directory and its inputs (ids, pixels, token types,
attention mask, tokens to feed) — never text or images: every implementation is fed the same ids
and pixels, its own processor bypassed — and returns the activations it can expose, named as in
refpg's dump format (`refpg.diff`): `<phase>/<activation>`, phase `prefill` or `decode.<k>`, each
array with its batch dimension first. Logits of the prefill and of every decode step are required;
per-layer activations are compared where the implementation exposes them.

Built in: `refpg[:backend]`, `dump:DIR` (DIR/<case>.npz written by an implementation refpg cannot
run; `refpg conform --write-cases DIR` gives it the checkpoints and inputs), `transformers` and
`mlx-vlm` (optional packages: `pip install "refpg[conform]"`; imported only when asked for).
"""

from __future__ import annotations

import os

import numpy as np

from refpg.conform.cases import Inputs


class AdapterUnavailable(RuntimeError):
    """The implementation cannot be run here (its package is missing), with the one-line reason."""


class Adapter:
    """An implementation under test. Subclasses set `name` and implement `run`."""

    name = "?"

    def describe(self) -> str:
        """The implementation and its version, for the report."""
        return self.name

    def run(self, case: str, model_dir: str, inputs: Inputs) -> dict[str, np.ndarray]:
        """The activations of a prefill of `inputs` and of one decode step per column of
        inputs.decode (token type 1, attention mask 1), by dump name."""
        raise NotImplementedError


class RefpgAdapter(Adapter):
    """refpg itself, with any backend selection ("numpy", "cpp", "matmul=cpp,attention=numpy", …)."""

    def __init__(self, backend: str = "numpy"):
        self.backend = backend
        self.name = f"refpg:{backend}"

    def describe(self) -> str:
        import refpg

        return f"refpg {refpg.__version__} ({self.backend})"

    def run(self, case: str, model_dir: str, inputs: Inputs) -> dict[str, np.ndarray]:
        from refpg.model import PaliGemma
        from refpg.tap import capture

        model = PaliGemma.from_pretrained(model_dir, backend=self.backend)
        B, T = inputs.input_ids.shape
        acts: dict[str, np.ndarray] = {}
        phase = ["prefill"]
        cache = model.new_cache(B, T + inputs.steps)
        with capture(lambda name, x: acts.__setitem__(f"{phase[0]}/{name}", np.array(x, dtype=np.float32))):
            model(inputs.input_ids, inputs.pixel_values, token_type_ids=inputs.token_type_ids,
                  attention_mask=inputs.attention_mask, cache=cache)
            for k in range(inputs.steps):
                phase[0] = f"decode.{k}"
                model(inputs.decode[:, k:k + 1], token_type_ids=np.ones((B, 1), np.int64), cache=cache)
        return acts


class DumpAdapter(Adapter):
    """Activations another implementation wrote: DIR/<case>.npz in refpg's dump format."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise AdapterUnavailable(f"dump:{directory}: not a directory of <case>.npz dumps")
        self.directory = directory
        self.name = f"dump:{directory}"

    def run(self, case: str, model_dir: str, inputs: Inputs) -> dict[str, np.ndarray]:
        from refpg.diff import Dump

        dump = Dump(os.path.join(self.directory, f"{case}.npz"))
        return {name: np.asarray(dump[name], np.float32) for name in dump.names}


def make_adapter(spec: str) -> Adapter:
    """`refpg`, `refpg:BACKEND`, `transformers`, `mlx-vlm` or `dump:DIR` -> an Adapter;
    AdapterUnavailable when its package is missing, ValueError for an unknown spec."""
    kind, _, arg = spec.partition(":")
    if kind == "refpg":
        return RefpgAdapter(arg or "numpy")
    if kind == "dump" and arg:
        return DumpAdapter(arg)
    if spec == "transformers":
        from refpg.conform.transformers_adapter import TransformersAdapter

        return TransformersAdapter()
    if spec == "mlx-vlm":
        from refpg.conform.mlx_vlm_adapter import MlxVlmAdapter

        return MlxVlmAdapter()
    raise ValueError(f"unknown implementation {spec!r}: choose refpg[:BACKEND], transformers, mlx-vlm or dump:DIR")
