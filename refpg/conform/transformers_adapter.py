"""transformers as an implementation under test (`refpg conform --impl transformers`).

transformers' PaliGemmaForConditionalGeneration runs in float32 with eager attention, fed the case's
ids and pixels (its processor bypassed) the way its own `generate` feeds them: a prefill with the
token types and the attention mask, positions counting real tokens from 1, then one token per row
per decode step through its KV cache, with the attention mask grown by a column of ones, token
type 1 and each row's next position. Forward hooks on its modules report every activation under
refpg's names (`hooked`); tools/transformers_dump.py and tools/hf_oracle.py use the same hooks.

A checkpoint transformers loads only in part fails the case: the missing weights would be randomly
initialised and the outputs would agree with nothing but by chance.

torch and transformers are imported when the adapter is constructed, never when this module is.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from refpg.conform.adapters import Adapter, AdapterUnavailable
from refpg.conform.cases import Inputs

INSTALL = 'pip install "refpg[conform]"'


@contextmanager
def hooked(model, on_activation: Callable[[str, np.ndarray], None]) -> Iterator[None]:
    """Inside the block, every forward of a PaliGemmaForConditionalGeneration reports its
    activations under refpg's names, batch dimension first (logits excepted: they are the model's
    output). The vision tower's hooks fire only when pixel values are fed (the prefill)."""
    hooks = []

    def report(name, t):
        on_activation(name, t.detach().float().numpy().copy())

    def add(module, name):
        hooks.append(module.register_forward_hook(
            lambda _m, _a, out: report(name, out[0] if isinstance(out, tuple) else out)))

    pg = model.model
    vm = pg.vision_tower
    add(vm.embeddings, "vision.embeddings")
    for i, layer in enumerate(vm.encoder.layers):
        add(layer.self_attn, f"vision.{i}.attn_out")
        add(layer.mlp, f"vision.{i}.mlp_out")
        add(layer, f"vision.{i}")
    add(vm.post_layernorm, "vision.post_layernorm")
    add(pg.multi_modal_projector, "projector")
    lm = pg.language_model
    # the scaled embeddings with the image features in place: what the first decoder layer is given
    hooks.append(lm.layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: report("text.embeddings", kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True))
    for i, layer in enumerate(lm.layers):
        add(layer.self_attn, f"text.{i}.attn_out")
        if hasattr(layer, "post_feedforward_layernorm"):  # Gemma 2: each branch ends in its own norm
            add(layer.post_attention_layernorm, f"text.{i}.post_attn_norm")
        add(layer.mlp, f"text.{i}.mlp_out")
        if hasattr(layer, "post_feedforward_layernorm"):
            add(layer.post_feedforward_layernorm, f"text.{i}.post_ff_norm")
        add(layer, f"text.{i}")
    add(lm.norm, "text.norm")
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class CachedRun:
    """One prefill, then decode steps through transformers' KV cache, each fed as `generate` feeds it
    (transformers/generation/utils.py: `_prepare_position_ids_for_generation`,
    `_update_model_kwargs_for_generation`; PaliGemma's `prepare_inputs_for_generation` adds 1 to
    the positions). Activations go to on_activation(`<phase>/<name>`, array)."""

    def __init__(self, model, on_activation: Callable[[str, np.ndarray], None]):
        self.model = model
        self.on_activation = on_activation
        self.cache = None
        self.attention_mask = None
        self.positions = None
        self.steps = 0

    def _forward(self, phase: str, **kwargs) -> np.ndarray:
        import torch

        with hooked(self.model, lambda name, x: self.on_activation(f"{phase}/{name}", x)), torch.no_grad():
            out = self.model(**kwargs, attention_mask=self.attention_mask, position_ids=self.positions,
                             cache=self.cache, use_cache=True)
        self.cache = out.cache
        logits = out.logits.float().numpy()
        self.on_activation(f"{phase}/logits", logits)
        return logits

    def prefill(self, input_ids: np.ndarray, pixel_values: np.ndarray, token_type_ids: np.ndarray,
                attention_mask: np.ndarray) -> np.ndarray:
        """[B, T] ids, [B, 3, S, S] pixels, [B, T] token types and mask -> [B, T, V] logits."""
        import torch

        self.attention_mask = torch.from_numpy(np.asarray(attention_mask, np.int64))
        # generate: cumsum(mask) - 1, padding set to 0; PaliGemma: + 1 (positions count real tokens from 1)
        positions = (self.attention_mask.cumsum(-1) - 1).masked_fill(self.attention_mask == 0, 0)
        self.positions = positions + 1
        return self._forward("prefill", input_ids=torch.from_numpy(np.asarray(input_ids, np.int64)),
                             pixel_values=torch.from_numpy(np.asarray(pixel_values, np.float32)),
                             token_type_ids=torch.from_numpy(np.asarray(token_type_ids, np.int64)))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """[B, 1] ids, one per row, after everything fed so far -> [B, 1, V] logits."""
        import torch

        tokens = torch.from_numpy(np.asarray(tokens, np.int64).reshape(-1, 1))
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(tokens)], dim=-1)
        self.positions = self.positions[:, -1:] + 1  # each row's next position
        logits = self._forward(f"decode.{self.steps}", input_ids=tokens, token_type_ids=torch.ones_like(tokens))
        self.steps += 1
        return logits


def load_model(model_dir: str):
    """PaliGemmaForConditionalGeneration from model_dir, float32, eager attention; ValueError when
    transformers leaves a weight of the model unloaded (it would randomly initialise it) or a
    tensor of the checkpoint unused."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    from transformers.utils import logging

    # quiet while loading (no progress bar, no load report: what it would report is raised below)
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        model, info = PaliGemmaForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()
    problems = [f"{len(info[kind])} {what} ({', '.join(sorted(map(str, info[kind]))[:3])}"
                f"{', …' if len(info[kind]) > 3 else ''})"
                for kind, what in (("missing_keys", "weights missing from the checkpoint, randomly initialised"),
                                   ("unexpected_keys", "tensors of the checkpoint not loaded"),
                                   ("mismatched_keys", "tensors of the wrong shape"),
                                   ("error_msgs", "loading errors")) if info.get(kind)]
    if problems:
        raise ValueError(f"transformers loads {model_dir} only in part: {'; '.join(problems)}")
    return model.eval()


class TransformersAdapter(Adapter):
    """Hugging Face transformers' PaliGemma (float32, eager attention), every activation hooked."""

    name = "transformers"

    def __init__(self):
        missing = [p for p in ("torch", "transformers") if importlib.util.find_spec(p) is None]
        if missing:
            raise AdapterUnavailable(f"transformers adapter: {' and '.join(missing)} not installed ({INSTALL})")
        self._loaded: tuple[str, object] | None = None  # (model_dir, model): the last checkpoint loaded

    def describe(self) -> str:
        v = importlib.metadata.version
        return f"transformers {v('transformers')} (torch {v('torch')}, float32, eager attention)"

    def model(self, model_dir: str):
        """The model of model_dir, loaded once for the cases that share it (the catalogue keeps them
        together; only the last one is held, so a real checkpoint is not kept twice)."""
        key = os.path.realpath(model_dir)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous one before loading the next
            self._loaded = (key, load_model(model_dir))
        return self._loaded[1]

    def run(self, case: str, model_dir: str, inputs: Inputs) -> dict[str, np.ndarray]:
        acts: dict[str, np.ndarray] = {}
        run = CachedRun(self.model(model_dir), acts.__setitem__)
        run.prefill(inputs.input_ids, inputs.pixel_values, inputs.token_type_ids, inputs.attention_mask)
        for k in range(inputs.steps):
            run.step(inputs.decode[:, k:k + 1])
        return acts
