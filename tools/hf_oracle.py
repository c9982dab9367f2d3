"""transformers as the oracle: its processor for a checkpoint directory, and hooks that name its
activations the way refpg does (refpg.tap), so the two can be compared activation by activation.
Tool/test code only: refpg never imports torch or transformers."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np


def hf_processor(model_dir: str):
    """transformers' PaliGemmaProcessor for this directory, with the PIL image processor."""
    from transformers import GemmaTokenizer, PaliGemmaConfig, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vision = PaliGemmaConfig.from_pretrained(model_dir).vision_config
    size = vision.image_size
    kwargs = {}
    pre = os.path.join(model_dir, "preprocessor_config.json")
    if os.path.isfile(pre):
        cfg = json.load(open(pre))
        kwargs = {k: cfg[k] for k in ("image_mean", "image_std", "rescale_factor", "resample") if k in cfg}
    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size}, **kwargs)
    image_processor.image_seq_length = (size // vision.patch_size) ** 2
    tokenizer = GemmaTokenizer.from_pretrained(model_dir)  # converts tokenizer.model
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


@contextmanager
def hooked(model, on_activation: Callable[[str, np.ndarray], None]) -> Iterator[None]:
    """Inside the block, every forward of a PaliGemmaForConditionalGeneration reports its
    activations under refpg's names (logits excepted: they are the model's output)."""
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


def record_activations(model, inputs: dict, position_ids) -> dict:
    """Run transformers' forward with hooks; return refpg-named activations (numpy float32)."""
    import torch

    acts: dict[str, np.ndarray] = {}
    with hooked(model, acts.__setitem__), torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()},
                    position_ids=torch.from_numpy(position_ids))
    acts["logits"] = out.logits.float().numpy()
    return acts
