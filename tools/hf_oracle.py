"""transformers as the oracle: its processor for a checkpoint directory, and its activations named the
way refpg names them (refpg.tap), so the two can be compared activation by activation. The hooks
that name them are the conformance suite's (refpg.conform.transformers_adapter.hooked), which
imports torch and transformers only when used; refpg itself never imports them."""

from __future__ import annotations

import json
import os

import numpy as np

from refpg.conform.transformers_adapter import hooked


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


def record_activations(model, inputs: dict, position_ids) -> dict:
    """Run transformers' forward with hooks; return refpg-named activations (numpy float32)."""
    import torch

    acts: dict[str, np.ndarray] = {}
    with hooked(model, acts.__setitem__), torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()},
                    position_ids=torch.from_numpy(position_ids))
    acts["logits"] = out.logits.float().numpy()
    return acts
