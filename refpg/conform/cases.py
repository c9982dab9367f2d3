"""The case catalogue: tiny checkpoints + inputs, each exercising one rule of PaliGemma.

A case names its rule (RULES), the checkpoint it runs on (CHECKPOINTS: a sparse config.json and how
the weights are stored) and its inputs — input ids, pixel values, token types, attention mask, and
the tokens fed one at a time through the KV cache afterwards. Every case differs from `core` in
one thing, so a case that fails where `core` passes points at its rule. Everything is generated
from fixed seeds: the same catalogue on every machine, nothing downloaded.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from refpg.config import PaliGemmaConfig, config_from_dict
from refpg.conform.checkpoint import BOS, EOS, IMAGE_TOKEN, LOC0, NEWLINE, PAD, VOCAB, write_checkpoint

# rule -> what an implementation must do (the README's "Numerics" section, one rule at a time)
RULES = {
    "core": "the whole forward pass of a plain PaliGemma: SigLIP, projector, Gemma, tied LM head",
    "config-defaults": "a field config.json leaves out takes transformers' default (Gemma / Gemma 2 / SigLIP)",
    "head-dim": "head_dim is read from the config, not derived as hidden_size / num_attention_heads",
    "norm-eps": "each tower's norms use its own eps from the config (SigLIP layer_norm_eps, Gemma rms_norm_eps)",
    "tensor-names": "every tensor naming published checkpoints use loads the same weights",
    "dtypes-shards": "F32, F16 and BF16 tensors, in one file or shards listed by the index, load exactly",
    "gqa": "query head h reads kv head h // (heads / kv_heads): MQA, GQA and MHA",
    "gemma2": "Gemma 2: sandwich norms, attention and final logit soft-caps, query_pre_attn_scalar",
    "sliding-window": "Gemma 2's even layers see a window of sliding_window keys over the causal part only "
                      "(the prefix keeps seeing the whole prefix), also when decoding past the window",
    "image-tokens": "the number of <image> tokens is (image_size / patch_size)^2 (1024 / 4096 at 448 / 896)",
    "left-padding": "in a batch, shorter prompts are left-padded: padding keys are never seen and positions "
                    "count real tokens only",
    "prefix-lm": "image + prompt (token type 0) see each other both ways; the suffix (type 1) is causal — "
                 "not causal everywhere, not bidirectional everywhere",
    "kv-cache": "tokens decoded one at a time through the KV cache see everything cached, causally",
    "loc-tokens": "<locXXXX> tokens are ordinary vocabulary ids, in the prompt and in the suffix",
}


@dataclass
class Inputs:
    """What every implementation is fed, bypassing its own processor."""

    input_ids: np.ndarray       # [B, T] int64
    pixel_values: np.ndarray    # [B, 3, S, S] float32
    token_type_ids: np.ndarray  # [B, T] int64: 0 prefix, 1 suffix
    attention_mask: np.ndarray  # [B, T] int64: 0 on left padding
    decode: np.ndarray          # [B, K] int64: fed one column at a time after the first pass

    @property
    def steps(self) -> int:
        return self.decode.shape[1]


@dataclass(frozen=True)
class Checkpoint:
    """How a case's checkpoint is written (refpg.conform.checkpoint.write_checkpoint's arguments)."""

    config: dict
    dtype: str = "F32"
    naming: str = "hub"
    shards: int = 1
    scale: dict = field(default_factory=dict)
    seed: int = 0
    drop: tuple = ()  # top-level config fields left out

    def write(self, out_dir: str) -> str:
        config = {k: v for k, v in self.config.items() if k not in self.drop}
        return write_checkpoint(out_dir, config, self.seed, self.dtype, self.naming, self.shards, self.scale)


def tiny_config(text: dict | None = None, vision: dict | None = None, **top) -> dict:
    """A sparse config.json of a tiny PaliGemma (64-wide Gemma of 3 layers, 32-wide SigLIP of 2):
    only what differs from the defaults, as the published ones are."""
    cfg = {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
        "image_token_index": IMAGE_TOKEN, "vocab_size": VOCAB, "projection_dim": 64, "hidden_size": 64,
        "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS,
        "text_config": {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 96,
                        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                        "num_hidden_layers": 3, "vocab_size": VOCAB},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 72,
                          "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 8, "image_size": 32,
                          "projection_dim": 64, "vision_use_head": False},
        **top,
    }
    cfg["text_config"].update(text or {})
    cfg["vision_config"].update(vision or {})
    n = (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2
    cfg["text_config"]["num_image_tokens"] = cfg["vision_config"]["num_image_tokens"] = n
    return cfg


GEMMA2 = {"model_type": "gemma2", "num_key_value_heads": 2}

CHECKPOINTS = {
    "gemma-f32": Checkpoint(tiny_config()),
    # without the legacy top-level hidden_size (transformers 5 does not read it; the text width is
    # text_config.hidden_size)
    "gemma-no-top-level-width": Checkpoint(tiny_config(), drop=("hidden_size",)),
    # hidden / heads = 16, but the config says 24; plain multi-head attention
    "gemma-mha-head-dim-24": Checkpoint(tiny_config({"num_key_value_heads": 4, "head_dim": 24})),
    "gemma-gqa": Checkpoint(tiny_config({"num_key_value_heads": 2})),
    # eps values far from the 1e-6 defaults, each tower its own (SigLIP's large enough that every one of
    # its layer norms, the post-layernorm included, moves the output by more than 1e-3 when misread)
    "gemma-eps": Checkpoint(tiny_config({"rms_norm_eps": 1e-4}, {"layer_norm_eps": 5e-2})),
    # eps left to their defaults (1e-6), with embeddings small enough that eps matters in the first norms
    "gemma-small-embeddings": Checkpoint(tiny_config(), scale={
        "embed_tokens": 1e-3, "multi_modal_projector": 1e-3, "patch_embedding": 1e-3, "position_embedding": 1e-3}),
    "gemma-bf16-new-3-shards": Checkpoint(tiny_config(), dtype="BF16", naming="new", shards=3),
    "gemma-f16-tf5-2-shards": Checkpoint(tiny_config(), dtype="F16", naming="tf5-save", shards=2),
    # Gemma 2 with soft-caps and query_pre_attn_scalar left out (50, 30, 256), weights scaled so that
    # both caps and the scale matter
    "gemma2-defaults": Checkpoint(tiny_config(GEMMA2), scale={
        "self_attn.q_proj": 12.0, "self_attn.k_proj": 12.0, "embed_tokens": 200.0}),
    # Gemma 2 with every field written out, a window of 4 keys
    "gemma2-window-4": Checkpoint(tiny_config({**GEMMA2, "sliding_window": 4, "attn_logit_softcapping": 50.0,
                                               "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16})),
    "gemma-448-shape": Checkpoint(tiny_config(vision={"image_size": 64})),    # 64 image tokens: 4x
    "gemma-896-shape": Checkpoint(tiny_config(vision={"image_size": 128})),   # 256 image tokens: 16x
}


def prompt_ids(rng: np.random.Generator, n: int, loc: bool = False) -> list[int]:
    """n token ids of ordinary text (or <loc> tokens, every other one)."""
    ids = rng.integers(LOC0 + 1024 + 300, IMAGE_TOKEN, n).tolist()  # clear of specials, locs and segs
    if loc:
        ids[::2] = (LOC0 + rng.integers(0, 1024, len(ids[::2]))).tolist()
    return ids


def make_inputs(cfg: PaliGemmaConfig, prompts: list[int], suffixes: list[int] | None = None, decode: int = 0,
                loc: bool = False, seed: int = 0) -> Inputs:
    """One row per prompt length: <image>×N <bos> prompt \\n [suffix], left-padded; random pixels;
    `decode` ordinary tokens per row to feed afterwards."""
    rng = np.random.default_rng(seed)
    suffixes = suffixes or [0] * len(prompts)
    rows = []
    for n_prompt, n_suffix in zip(prompts, suffixes):
        prefix = [IMAGE_TOKEN] * cfg.num_image_tokens + [BOS] + prompt_ids(rng, n_prompt, loc) + [NEWLINE]
        rows.append((prefix + prompt_ids(rng, n_suffix, loc), [0] * len(prefix) + [1] * n_suffix))
    T = max(len(ids) for ids, _ in rows)
    B = len(rows)
    input_ids = np.full((B, T), PAD, np.int64)
    types = np.zeros((B, T), np.int64)
    mask = np.zeros((B, T), np.int64)
    for b, (ids, ty) in enumerate(rows):
        input_ids[b, T - len(ids):], types[b, T - len(ids):], mask[b, T - len(ids):] = ids, ty, 1
    S = cfg.vision.image_size
    pixels = rng.uniform(-1, 1, (B, 3, S, S)).astype(np.float32)
    fed = np.array([prompt_ids(rng, decode, loc) for _ in range(B)], np.int64).reshape(B, decode)
    return Inputs(input_ids, pixels, types, mask, fed)


@dataclass(frozen=True)
class Case:
    name: str
    rule: str
    checkpoint: str
    inputs: Callable[[PaliGemmaConfig], Inputs]
    note: str = ""

    def config(self) -> PaliGemmaConfig:
        return config_from_dict(copy.deepcopy(CHECKPOINTS[self.checkpoint].config))


def _case(name, rule, checkpoint, note="", **inputs) -> Case:
    return Case(name, rule, checkpoint, lambda cfg: make_inputs(cfg, **{"prompts": [6], **inputs}), note)


CASES: list[Case] = [
    _case("core", "core", "gemma-f32", "one image, a prompt, prefill only"),
    _case("kv-cache-decode", "kv-cache", "gemma-f32", "8 tokens fed one at a time through the cache", decode=8),
    _case("prefix-and-suffix-in-one-pass", "prefix-lm", "gemma-f32", "a 5-token suffix in the same pass",
          suffixes=[5], decode=2),
    _case("left-padded-batch", "left-padding", "gemma-f32", "two rows, prompts of 3 and 12 tokens",
          prompts=[3, 12], decode=3),
    _case("padded-batch-with-suffixes", "left-padding", "gemma-f32", "padding and suffixes together",
          prompts=[9, 2], suffixes=[2, 4], decode=2),
    _case("loc-tokens", "loc-tokens", "gemma-f32", "<loc> tokens in prompt, suffix and decode", suffixes=[6],
          decode=3, loc=True),
    _case("head-dim-from-config", "head-dim", "gemma-mha-head-dim-24", "head_dim 24, hidden / heads = 16",
          decode=2),
    _case("gqa", "gqa", "gemma-gqa", "4 query heads on 2 kv heads", decode=2),
    _case("norm-eps-from-config", "norm-eps", "gemma-eps", "layer_norm_eps 5e-2, rms_norm_eps 1e-4", decode=1),
    _case("text-width-from-text-config", "config-defaults", "gemma-no-top-level-width",
          "no top-level hidden_size: the width is text_config's", decode=1),
    _case("norm-eps-defaults", "config-defaults", "gemma-small-embeddings",
          "eps left out (1e-6), small embeddings make it matter", decode=1),
    _case("bf16-new-names-3-shards", "tensor-names", "gemma-bf16-new-3-shards",
          "model.* names + lm_head.weight, BF16, 3 shards", decode=2),
    _case("f16-tf5-names-2-shards", "dtypes-shards", "gemma-f16-tf5-2-shards",
          "vision_tower.* without vision_model., F16, 2 shards", decode=2),
    _case("gemma2-config-defaults", "gemma2", "gemma2-defaults",
          "soft-caps and query_pre_attn_scalar left out; scores and logits large enough that they matter",
          suffixes=[3], decode=2),
    _case("gemma2-decode-past-window", "sliding-window", "gemma2-window-4",
          "window 4 < a 25-token prefix, then a 3-token suffix and 6 decoded tokens", suffixes=[3], decode=6),
    _case("gemma2-padded-batch", "sliding-window", "gemma2-window-4", "the window with left padding",
          prompts=[2, 8], suffixes=[3, 1], decode=3),
    _case("image-tokens-448-shape", "image-tokens", "gemma-448-shape", "64 image tokens (4x)", decode=1),
    _case("image-tokens-896-shape", "image-tokens", "gemma-896-shape", "256 image tokens (16x)", decode=1),
]
BY_NAME = {c.name: c for c in CASES}


def select(names: list[str] | None) -> list[Case]:
    """The cases named (all when None); ValueError naming an unknown one."""
    if not names:
        return list(CASES)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown case {unknown[0]!r}; cases are {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def write_case_checkpoint(case: Case, root: str) -> str:
    """The case's checkpoint under root/<checkpoint name>, written once per root."""
    out = os.path.join(root, case.checkpoint)
    if not os.path.isfile(os.path.join(out, "config.json")):
        CHECKPOINTS[case.checkpoint].write(out)
    return out


def export_cases(cases: list[Case], out_dir: str) -> list[str]:
    """For an implementation refpg cannot run: out_dir/checkpoints/<checkpoint>/ and, per case,
    out_dir/<case>.inputs.npz (input_ids, pixel_values, token_type_ids, attention_mask, decode, and
    `checkpoint`: the directory to load, relative to out_dir). The implementation writes its
    activations as <case>.npz in refpg's dump format into a directory D; `refpg conform --impl dump:D`
    compares them. Returns the files written."""
    written = []
    for case in cases:
        model_dir = write_case_checkpoint(case, os.path.join(out_dir, "checkpoints"))
        inputs = case.inputs(case.config())
        path = os.path.join(out_dir, f"{case.name}.inputs.npz")
        np.savez(path, input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                 token_type_ids=inputs.token_type_ids, attention_mask=inputs.attention_mask, decode=inputs.decode,
                 checkpoint=np.array(os.path.relpath(model_dir, out_dir)), rule=np.array(case.rule))
        written.append(path)
    return written
