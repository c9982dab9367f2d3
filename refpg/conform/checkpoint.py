"""Tiny random PaliGemma checkpoints, written with NumPy alone in the published layouts.

A checkpoint directory is what a hub download holds: a sparse `config.json`, `model.safetensors`
(or shards + `model.safetensors.index.json`), `tokenizer.model` (the demo model's: `<loc0000>`… at
ids 6…1029, `<seg000>`… at 1030…1157) and `preprocessor_config.json`. Every weight is random —
norm weights included, so no bug hides behind a zero or a one — drawn from a seed, and stored as
F32, F16 or BF16 under one of the three namings PaliGemma checkpoints have used.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from refpg import DEMO_MODEL
from refpg.config import config_from_dict
from refpg.formats import f32_to_bf16
from refpg.safetensors_io import write_safetensors
from refpg.weights import LM_HEAD, PROJECTOR, TEXT, VISION, expected_shapes


def _demo_pieces() -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=os.path.join(DEMO_MODEL, "tokenizer.model")).get_piece_size()


IMAGE_TOKEN = _demo_pieces()  # <image>: the id just past the demo tokenizer's pieces, as published
VOCAB = IMAGE_TOKEN + 64      # and 64 spare embedding rows
PAD, EOS, BOS, NEWLINE = 0, 1, 2, 5
LOC0 = 6              # <loc0000>; <locXXXX> = LOC0 + XXXX

# the hub's prefix -> the prefix on disk, per naming (and whether the tied LM head is written too)
NAMINGS = {
    "hub": ({VISION: VISION, TEXT: TEXT, PROJECTOR: PROJECTOR}, False),
    # newer transformers: everything under model., and the tied head written out as lm_head.weight
    "new": ({VISION: "model.vision_tower.vision_model.", TEXT: "model.language_model.",
             PROJECTOR: "model.multi_modal_projector.linear."}, True),
    # transformers 5's save_pretrained: vision_tower.* without the inner vision_model.
    "tf5-save": ({VISION: "vision_tower.", TEXT: TEXT, PROJECTOR: PROJECTOR}, False),
}
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # BF16 is written as its bits


def random_weights(config: dict, seed: int, scale: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """float32 weights by hub name: linears ~ N(0, 1/fan_in), embeddings and biases small, norm
    weights around their neutral value (0 for Gemma's 1 + w, 1 for LayerNorm). `scale` multiplies the
    tensors whose name holds a key (to make soft-caps or eps values matter)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(config_from_dict(config)).items():
        z = rng.standard_normal(shape)
        if "norm" in name and name.endswith("weight"):
            w = (0.0 if name.startswith(TEXT) else 1.0) + 0.3 * z
        elif name.endswith("bias"):
            w = 0.2 * z
        elif "embed_tokens" in name:
            w = 0.03 * z
        elif "position_embedding" in name:
            w = 0.5 * z
        else:
            w = z / math.sqrt(math.prod(shape[1:]))
        for key, factor in (scale or {}).items():
            if key in name:
                w = w * factor
        out[name] = w.astype(np.float32)
    return out


def write_checkpoint(out_dir: str, config: dict, seed: int = 0, dtype: str = "F32", naming: str = "hub",
                     shards: int = 1, scale: dict[str, float] | None = None) -> str:
    """Write a checkpoint directory; returns it. The weights are rounded to `dtype` on disk; a
    reference run reads them back from there, so the rounding is part of the model."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for name in ("tokenizer.model", "preprocessor_config.json"):
        shutil.copy(os.path.join(DEMO_MODEL, name), out_dir)
    size = config.get("vision_config", {}).get("image_size", 224)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:  # the demo's, for this size
        json.dump({"image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
                   "size": {"height": size, "width": size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                   "rescale_factor": 1 / 255, "resample": 3,
                   "image_seq_length": config_from_dict(config).num_image_tokens}, f, indent=1)
    prefixes, write_head = NAMINGS[naming]
    weights = random_weights(config, seed, scale)
    if write_head:
        weights[LM_HEAD] = weights[TEXT + "embed_tokens.weight"]
    tensors = {}
    for name, w in weights.items():
        prefix = next((p for p in prefixes if name.startswith(p)), "")
        disk = prefixes[prefix] + name[len(prefix):] if prefix else name
        tensors[disk] = (dtype, f32_to_bf16(w) if dtype == "BF16" else w.astype(DTYPES[dtype]))
    names = sorted(tensors)
    if shards == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
        return out_dir
    per, weight_map = math.ceil(len(names) / shards), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s * per:(s + 1) * per]
        write_safetensors(os.path.join(out_dir, file), {n: tensors[n] for n in part})
        weight_map.update({n: file for n in part})
    total = sum(a.nbytes for _, a in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return out_dir
