#!/usr/bin/env python3
"""Write tiny random PaliGemma checkpoints in the published layout, with transformers' activations.

Each variant is a directory like a hub download: a sparse `config.json`, `model.safetensors` (or
shards + `model.safetensors.index.json`), `tokenizer.model`, `preprocessor_config.json`, plus
`reference.npz`: what transformers (the oracle) computes on it — every named activation of a
prefill, logits of a prompt + suffix in one pass, and greedy tokens from `generate`, for one image
and for a left-padded batch of two.

Every weight is random, norm weights included, so no bug can hide behind a zero or a one.
Uses torch + transformers (tool/test dependencies only; refpg never imports them).

    python tools/make_tiny_checkpoint.py --out /tmp/tiny --variant f32-hub-single
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_oracle import hf_processor, record_activations  # noqa: E402
from tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

# name -> how the checkpoint is written
VARIANTS = {
    # PaliGemma-1-like: MQA, hub naming, one file, float32
    "f32-hub-single": dict(dtype="float32", naming="hub", shards=1, kv_heads=1),
    # bf16 shards in newer transformers' naming with an explicit lm_head.weight
    "bf16-new-sharded": dict(dtype="bfloat16", naming="new", shards=3, kv_heads=1),
    # GQA (2 kv heads), float16 shards, the names transformers 5's save_pretrained writes
    # (`vision_tower.*` without `vision_model.`), rope_theta nested in rope_parameters
    "f16-gqa-sharded": dict(dtype="float16", naming="tf5-save", shards=2, kv_heads=2, rope_parameters=True),
    # PaliGemma 2: Gemma 2 decoder (sandwich norms, soft-capping, sliding window 8 < prompt length on
    # layers 0 and 2), query_pre_attn_scalar left to its default; small caps so capping matters
    "gemma2-bf16": dict(dtype="bfloat16", naming="hub", shards=1, kv_heads=2, gemma2=True),
    # the 448/896 checkpoints' shape: 4x the image tokens of the 224 one (64 here), same patch size
    "f32-hires": dict(dtype="float32", naming="hub", shards=1, kv_heads=1, image_size=64),
    # plain multi-head attention (kv heads = heads) with head_dim 24 != hidden / heads, and eps values
    # far from the defaults (SigLIP's layer_norm_eps, Gemma's rms_norm_eps; each 1e-6 by default)
    # so that code reading a default, or the other tower's eps, is caught
    "f32-mha-eps": dict(dtype="float32", naming="hub", shards=1, kv_heads=4, head_dim=24,
                        layer_norm_eps=1e-3, rms_norm_eps=1e-4),
}

PROMPTS = ["caption en", "answer en what is the colour of the 12 boxes?"]
SUFFIX = "a red circle <loc0012><loc1000> on 3 squares"
GREEDY_TOKENS = 8


def sparse_config(sp_vocab: int, v: dict) -> dict:
    """A config.json as published: only what differs from transformers' defaults."""
    image_size = v.get("image_size", 32)
    n_image = (image_size // 8) ** 2
    text = {
        "model_type": "gemma", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_hidden_layers": 3, "num_key_value_heads": v["kv_heads"], "head_dim": v.get("head_dim", 16),
        "num_image_tokens": n_image, "vocab_size": sp_vocab + 64, "torch_dtype": v["dtype"],
    }
    if "rms_norm_eps" in v:
        text["rms_norm_eps"] = v["rms_norm_eps"]
    if v.get("rope_parameters"):
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    if v.get("gemma2"):
        text.update(model_type="gemma2", sliding_window=8, attn_logit_softcapping=0.5,
                    final_logit_softcapping=2.0)
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 72,
        "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 8, "image_size": image_size,
        "num_image_tokens": n_image, "projection_dim": 64, "vision_use_head": False,
    }
    if "layer_norm_eps" in v:
        vision["layer_norm_eps"] = v["layer_norm_eps"]
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
        "image_token_index": sp_vocab, "vocab_size": sp_vocab + 64, "projection_dim": 64, "hidden_size": 64,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1, "torch_dtype": v["dtype"],
        "text_config": text, "vision_config": vision,
    }


def randomize(model, seed: int) -> None:
    """Every parameter random: linears ~ N(0, 1/in), norms around their neutral value."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                # Gemma's RMSNorm multiplies by (1 + w): w around 0; LayerNorm's w around 1
                base = 0.0 if "language_model" in name else 1.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.03 * torch.randn(p.shape, generator=g))
            elif "position_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


NAMINGS = {
    # in-memory prefix (transformers 5)  ->  prefix on disk, per naming
    "hub": {"model.vision_tower.": "vision_tower.vision_model.", "model.multi_modal_projector.":
            "multi_modal_projector.", "model.language_model.": "language_model.model."},
    "new": {"model.vision_tower.": "model.vision_tower.vision_model.", "model.multi_modal_projector.":
            "model.multi_modal_projector.", "model.language_model.": "model.language_model."},
    "tf5-save": {"model.vision_tower.": "vision_tower.", "model.multi_modal_projector.":
                 "multi_modal_projector.", "model.language_model.": "language_model.model."},
}


def disk_named_state(model, naming: str) -> dict:
    """The state dict under the names a checkpoint of that naming uses on disk."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if naming == "new":
                out[name] = t
            continue  # the hub's files leave the tied head out
        prefix = next(p for p in NAMINGS[naming] if name.startswith(p))
        out[NAMINGS[naming][prefix] + name[len(prefix):]] = t
    return out


def save_safetensors(state: dict, out_dir: str, shards: int) -> None:
    from safetensors.torch import save_file

    names = sorted(state)
    if shards == 1:
        save_file({n: state[n].contiguous() for n in names}, os.path.join(out_dir, "model.safetensors"),
                  metadata={"format": "pt"})
        return
    weight_map = {}
    per = math.ceil(len(names) / shards)
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in part}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def check_transformers_reads(model_dir: str, model) -> None:
    """The layout is real only if transformers loads every weight back from it unchanged."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    loaded = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    want, got = model.state_dict(), loaded.state_dict()
    if set(want) != set(got):
        raise RuntimeError(f"transformers read other tensors from {model_dir}: {sorted(set(want) ^ set(got))[:5]}")
    for name, t in want.items():
        if not torch.equal(t, got[name]):
            raise RuntimeError(f"transformers read {name} from {model_dir} with other values")


def test_images(seed: int = 0):
    """Two small odd-sized images with structure (gradients + blocks), so resizing matters."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for h, w in ((45, 37), (20, 64)):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], -1).astype(np.uint8)
        img[: h // 2, : w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        images.append(Image.fromarray(img))
    return images


def positions_of(attention_mask: np.ndarray) -> np.ndarray:
    """PaliGemma's 1-based positions counting real tokens only (padding gets 1, unused)."""
    return np.where(attention_mask == 1, np.cumsum(attention_mask, axis=1), 1).astype(np.int64)


def write_reference(model_dir: str, model) -> None:
    """reference.npz: transformers' outputs on this checkpoint, keyed `<case>/<name>`."""
    import torch

    proc = hf_processor(model_dir)
    images = test_images()
    ref: dict[str, np.ndarray] = {}

    def as_np(batch) -> dict:
        return {k: batch[k].numpy() for k in ("input_ids", "pixel_values", "token_type_ids", "attention_mask")}

    cases = {
        # one image, prompt only: every activation of the prefill
        "single": as_np(proc(images=[images[0]], text=[PROMPTS[0]], return_tensors="pt")),
        # two images, prompts of different lengths: left padding
        "batch": as_np(proc(images=images, text=PROMPTS, return_tensors="pt", padding="longest")),
        # prompt + suffix in one pass: the logits a KV-cached decode of the suffix must reproduce
        "suffix": as_np(proc(images=[images[0]], text=[PROMPTS[1]], suffix=[SUFFIX], return_tensors="pt")),
    }
    for case, inputs in cases.items():
        for k, v in inputs.items():
            ref[f"{case}/input/{k}"] = v
        acts = record_activations(model, inputs, positions_of(inputs["attention_mask"]))
        for k, v in acts.items():
            if case == "single" or k == "logits":
                ref[f"{case}/{k}"] = v
    for case in ("single", "batch"):
        inputs = {k: torch.from_numpy(ref[f"{case}/input/{k}"]) for k in
                  ("input_ids", "pixel_values", "token_type_ids", "attention_mask")}
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, inputs["input_ids"].shape[1]:].numpy()
        scores = torch.stack(out.scores, 1).float()  # [B, steps, V]
        top2 = scores.topk(2, dim=-1).values
        ref[f"{case}/greedy"] = new
        ref[f"{case}/greedy_margin"] = (top2[..., 0] - top2[..., 1]).numpy()  # how safe the argmax is
    np.savez(os.path.join(model_dir, "reference.npz"), **ref)


def make_tiny_checkpoint(out_dir: str, variant: str = "f32-hub-single", seed: int = 0,
                         reference: bool = True) -> str:
    """Write one variant to out_dir (created); returns out_dir."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    v = VARIANTS[variant]
    os.makedirs(out_dir, exist_ok=True)
    tok_path = write_tiny_tokenizer(out_dir)
    import sentencepiece as spm

    sp_vocab = spm.SentencePieceProcessor(model_file=tok_path).vocab_size()
    cfg_dict = sparse_config(sp_vocab, v)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    size = cfg_dict["vision_config"]["image_size"]
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
                   "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                   "rescale_factor": 1 / 255, "resample": 3, "size": {"height": size, "width": size},
                   "image_seq_length": cfg_dict["text_config"]["num_image_tokens"],
                   "processor_class": "PaliGemmaProcessor"}, f, indent=2)

    config = PaliGemmaConfig.from_pretrained(out_dir)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).float().eval()  # the oracle computes in float32
    randomize(model, seed)
    # Round the weights to the stored dtype, then compute in float32 on exactly those values.
    dtype = getattr(torch, v["dtype"])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    state = {k: t.to(dtype).clone() for k, t in disk_named_state(model, v["naming"]).items()}
    save_safetensors(state, out_dir, v["shards"])
    check_transformers_reads(out_dir, model)
    for i, image in enumerate(test_images()):
        image.save(os.path.join(out_dir, f"image{i}.png"))
    if reference:
        write_reference(out_dir, model)
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory to write (created)")
    ap.add_argument("--variant", default="f32-hub-single", choices=sorted(VARIANTS) + ["all"],
                    help="which layout to write; 'all' writes each into OUT/<variant>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="skip running transformers for reference.npz")
    args = ap.parse_args(argv)
    names = sorted(VARIANTS) if args.variant == "all" else [args.variant]
    for name in names:
        out = os.path.join(args.out, name) if args.variant == "all" else args.out
        make_tiny_checkpoint(out, name, args.seed, reference=not args.no_reference)
        print(f"wrote {name} -> {out}")


if __name__ == "__main__":
    main()
