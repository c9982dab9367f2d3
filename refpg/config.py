"""Model configuration: read a published (sparse) `config.json` and fill in every omitted field.

Published PaliGemma configs list only what differs from the defaults of transformers' config
classes (`SiglipVisionConfig`, `GemmaConfig`, `Gemma2Config`); the defaults below are those.

Every field is checked here, once, for its JSON type and its range: a wrong value is a
`ConfigError` naming the field (`text_config.hidden_size = 64.7 is not an integer`), never a
number silently truncated or a size that exhausts memory later. The ranges are generous bounds
on what a PaliGemma can be (`LIMITS`), not the published sizes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from refpg.errors import ConfigError
from refpg.formats import AFFINE_BITS, AFFINE_GROUP_SIZES

# Activations that are the tanh approximation of gelu, by the names configs use for it.
# ("gelu" in a Gemma config is a legacy name for the tanh approximation; transformers maps it too.)
GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new")
LAYER_TYPES = ("sliding_attention", "full_attention")

# Upper bounds of the integer fields (the published models are far inside them: 27 + 46 layers,
# width 4608, 257 216 tokens, 896-pixel images). A config beyond them is a mistake, and would
# otherwise make refpg allocate until memory runs out.
LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "vocab_size": 1 << 24,
    "image_size": 1 << 14,
    "patch_size": 1 << 10,
    "num_channels": 3,
    "max_position_embeddings": 1 << 24,
    "sliding_window": 1 << 24,
    "projection_dim": 1 << 16,
    "token_id": (1 << 31) - 1,
}




@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (`siglip_vision_model`)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """Gemma (`gemma`) or Gemma 2 (`gemma2`) decoder."""

    model_type: str = "gemma"
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    # Gemma 2 only (None for Gemma):
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class Quantization:
    """config.json's "quantization" (mlx-community checkpoints): MLX's affine group quantization
    (refpg.formats), `bits` per code in groups of `group_size`, for every quantized matrix unless
    `overrides` gives its module (e.g. "language_model.model.layers.0.mlp.down_proj") its own
    (bits, group_size) or None (left unquantized)."""

    bits: int
    group_size: int
    overrides: tuple[tuple[str, tuple[int, int] | None], ...] = ()

    def of(self, module: str) -> tuple[int, int] | None:
        """(bits, group_size) of a module's matrix, or None when the config leaves it unquantized."""
        return dict(self.overrides).get(module, (self.bits, self.group_size))


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 256000
    projection_dim: int = 2048
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    tie_word_embeddings: bool = True
    quantization: Quantization | None = None

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches


_GEMMA_DEFAULTS = dict(
    vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
    num_attention_heads=16, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
)
_GEMMA2_DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
    rope_theta=10000.0, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
    sliding_window=4096,
)


class _Fields:
    """One JSON object of config.json, read field by field: JSON type and range checked, errors
    naming the field by its path (`text_config.hidden_size`). An absent or null field is the default."""

    def __init__(self, d, path: str):
        if not isinstance(d, dict):
            raise ConfigError(f"{path or 'config'} must be a JSON object, got {_json_type(d)} {_short(d)}")
        self.d, self.path = d, path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def _bad(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.name(key)} = {_short(self.d[key])} {what}")

    def int(self, key: str, default: int, lo: int = 1, hi: int | None = None) -> int:
        """An integer in [lo, hi] (hi from LIMITS by the field's name); 64.0 is 64, 64.7 an error."""
        if not self.has(key):
            return default
        v = self.d[key]
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, "is not an integer")
        hi = LIMITS.get(key, LIMITS["token_id"]) if hi is None else hi
        if not lo <= v <= hi:
            raise self._bad(key, f"is out of range [{lo}, {hi}]")
        return v

    def number(self, key: str, default: float | None) -> float | None:
        """A finite number > 0 (epsilons, rope theta, soft-caps, scalars)."""
        if not self.has(key):
            return default
        v = self.d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(key, "is not a number")
        if not (math.isfinite(v) and v > 0):
            raise self._bad(key, "must be a finite number > 0")
        return float(v)

    def string(self, key: str, default: str) -> str:
        if not self.has(key):
            return default
        if not isinstance(self.d[key], str):
            raise self._bad(key, "is not a string")
        return self.d[key]

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        if not isinstance(self.d[key], bool):
            raise self._bad(key, "is not true or false")
        return self.d[key]

    def sub(self, key: str, default: dict) -> "_Fields":
        return _Fields(self.d[key] if self.has(key) else default, self.name(key))


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def vision_config_from_dict(d, path: str = "vision_config") -> VisionConfig:
    f = _Fields(d, path)
    model_type = f.string("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
        raise ConfigError(f"{f.name('model_type')} {model_type!r} is not supported (expected siglip_vision_model)")
    base = VisionConfig()
    cfg = VisionConfig(
        hidden_size=f.int("hidden_size", base.hidden_size),
        intermediate_size=f.int("intermediate_size", base.intermediate_size),
        num_hidden_layers=f.int("num_hidden_layers", base.num_hidden_layers),
        num_attention_heads=f.int("num_attention_heads", base.num_attention_heads),
        num_channels=f.int("num_channels", base.num_channels, lo=3),
        image_size=f.int("image_size", base.image_size),
        patch_size=f.int("patch_size", base.patch_size),
        layer_norm_eps=f.number("layer_norm_eps", base.layer_norm_eps),
        hidden_act=f.string("hidden_act", base.hidden_act),
    )
    if cfg.hidden_act not in GELU_TANH_NAMES:
        raise ConfigError(f"{f.name('hidden_act')} {cfg.hidden_act!r} is not supported "
                          f"(refpg implements {', '.join(GELU_TANH_NAMES)})")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"{f.name('image_size')} {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{f.name('hidden_size')} {cfg.hidden_size} is not a multiple of "
                          f"num_attention_heads {cfg.num_attention_heads}")
    return cfg


def text_config_from_dict(d, path: str = "text_config") -> TextConfig:
    f = _Fields(d, path)
    model_type = f.string("model_type", "gemma")
    if model_type == "gemma":
        defaults = _GEMMA_DEFAULTS
    elif model_type == "gemma2":
        defaults = _GEMMA2_DEFAULTS
    else:
        raise ConfigError(f"{f.name('model_type')} {model_type!r} is not supported (expected gemma or gemma2)")
    fields: dict = {"model_type": model_type}
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "head_dim", "max_position_embeddings"):
        fields[name] = f.int(name, defaults[name])
    fields["rms_norm_eps"] = f.number("rms_norm_eps", defaults["rms_norm_eps"])
    # transformers' Gemma MLP reads hidden_act, Gemma 2's reads hidden_activation (each ignores the
    # other). In a Gemma (1) config, legacy "gelu" means the tanh approximation (transformers maps
    # it); in Gemma 2 it is the exact erf gelu, which refpg does not implement.
    act_key = "hidden_act" if model_type == "gemma" else "hidden_activation"
    act = f.string(act_key, defaults["hidden_act"]) or defaults["hidden_act"]
    if act == "gelu" and model_type == "gemma":
        act = "gelu_pytorch_tanh"
    if act not in GELU_TANH_NAMES:
        raise ConfigError(f"{f.name(act_key)} {act!r} is not supported (refpg implements {', '.join(GELU_TANH_NAMES)})")
    fields["hidden_act"] = act
    # Newer configs nest rope_theta in rope_parameters.
    rope = f.sub("rope_parameters", {})
    rope_type = rope.string("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"{rope.name('rope_type')} {rope_type!r} is not supported (only default RoPE)")
    fields["rope_theta"] = rope.number("rope_theta", f.number("rope_theta", defaults["rope_theta"]))
    # An omitted kv-head count means plain multi-head attention.
    fields["num_key_value_heads"] = f.int("num_key_value_heads",
                                          defaults.get("num_key_value_heads", fields["num_attention_heads"]))
    if model_type == "gemma2":
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            # written as null: switched off (transformers keeps None); absent: Gemma 2's default
            fields[name] = f.number(name, None if name in f.d else float(defaults[name]))
        fields["sliding_window"] = f.int("sliding_window", defaults["sliding_window"])
        layers = fields["num_hidden_layers"]
        if f.has("layer_types"):
            layer_types = f.d["layer_types"]
            if not (isinstance(layer_types, list) and len(layer_types) == layers
                    and all(isinstance(t, str) and t in LAYER_TYPES for t in layer_types)):
                raise ConfigError(f"{f.name('layer_types')} must list {' or '.join(LAYER_TYPES)} for each of "
                                  f"{layers} layers, got {_short(layer_types)}")
        else:  # transformers' Gemma2Config: even layers slide, odd layers see everything
            layer_types = [LAYER_TYPES[i % 2] for i in range(layers)]
        fields["layer_types"] = tuple(layer_types)
    cfg = TextConfig(**fields)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"{f.name('num_attention_heads')} {cfg.num_attention_heads} is not a multiple of "
                          f"num_key_value_heads {cfg.num_key_value_heads}")
    if cfg.head_dim % 2:
        raise ConfigError(f"{f.name('head_dim')} must be even for RoPE, got {cfg.head_dim}")
    return cfg


# What transformers' PaliGemmaConfig builds when a sub-config is absent altogether (PaliGemma-3B).
_ABSENT_VISION = dict(intermediate_size=4096, hidden_size=1152, patch_size=14, image_size=224,
                      num_hidden_layers=27, num_attention_heads=16)
_ABSENT_TEXT = dict(hidden_size=2048, num_hidden_layers=18, intermediate_size=16384, num_attention_heads=8,
                    num_key_value_heads=1, vocab_size=257152)


def config_from_dict(d) -> PaliGemmaConfig:
    top = _Fields(d, "")
    model_type = top.string("model_type", "paligemma")
    if model_type != "paligemma":
        raise ConfigError(f"model_type {model_type!r} is not a PaliGemma model (expected 'paligemma')")
    vision = vision_config_from_dict(d["vision_config"] if top.has("vision_config") else _ABSENT_VISION)
    text = text_config_from_dict(d["text_config"] if top.has("text_config") else _ABSENT_TEXT)
    inner = top.sub("text_config", {})
    V = text.vocab_size

    # Old configs keep ids at the top level; transformers reads them from text_config too.
    def token_id(name: str, default: int) -> int:
        fields = inner if inner.has(name) else top
        if isinstance(fields.d.get(name), list):  # some configs list several eos ids; the first is <eos>
            ids = fields.d[name]
            fields = _Fields({name: ids[0] if ids else None}, fields.path)
        return fields.int(name, default, lo=0, hi=V - 1)

    image_key = "image_token_index" if top.has("image_token_index") else "image_token_id"
    cfg = PaliGemmaConfig(
        vision=vision,
        text=text,
        # <image> may lie past the embedding table (its embedding is replaced), but ids are int32
        image_token_index=top.int(image_key, 256000, lo=0),
        projection_dim=top.int("projection_dim", 2048),
        pad_token_id=token_id("pad_token_id", 0),
        eos_token_id=token_id("eos_token_id", 1),
        bos_token_id=token_id("bos_token_id", 2),
        tie_word_embeddings=top.boolean("tie_word_embeddings", True),
        quantization=quantization_from_dict(top),
    )
    if cfg.projection_dim != text.hidden_size:
        raise ConfigError(f"projection_dim {cfg.projection_dim} differs from text_config.hidden_size "
                          f"{text.hidden_size} (the projector maps image features into the text width)")
    if cfg.num_image_tokens + 2 > text.max_position_embeddings:
        raise ConfigError(f"text_config.max_position_embeddings {text.max_position_embeddings} cannot hold the "
                          f"{cfg.num_image_tokens} image tokens + <bos> + a prompt")
    return cfg


def quantization_from_dict(top: _Fields) -> Quantization | None:
    """"quantization" (what MLX writes; "quantization_config" is its copy for transformers), or None.
    Only MLX's affine mode is read; another scheme (bitsandbytes, GPTQ, AWQ, MLX's fp4/fp8 modes)
    is a ConfigError naming it, not weights silently misread."""
    key = "quantization" if top.has("quantization") else "quantization_config" if top.has("quantization_config") else None
    if key is None:
        return None
    q = top.sub(key, {})
    if q.has("quant_method"):
        raise ConfigError(f"{q.name('quant_method')} = {_short(q.d['quant_method'])}: refpg reads MLX's affine "
                          f"quantization (mlx-community checkpoints), not this scheme")
    mode = q.string("mode", "affine")
    if mode != "affine":
        raise ConfigError(f"{q.name('mode')} = {_short(mode)}: refpg reads MLX's affine quantization only")

    def bits_and_group(fields: _Fields) -> tuple[int, int]:
        for key, allowed in (("bits", AFFINE_BITS), ("group_size", AFFINE_GROUP_SIZES)):
            if not fields.has(key):
                raise ConfigError(f"{fields.name(key)} is missing (MLX's affine quantization states it)")
            if fields.int(key, 0, lo=0, hi=1 << 16) not in allowed:
                raise fields._bad(key, f"is not one of {', '.join(map(str, allowed))} (MLX's affine quantization)")
        return int(fields.d["bits"]), int(fields.d["group_size"])

    bits, group_size = bits_and_group(q)
    overrides = []
    for module, value in q.d.items():
        if module in ("bits", "group_size", "mode"):
            continue
        if value is False:
            overrides.append((module, None))
        elif isinstance(value, dict):
            sub = q.sub(module, {})
            if sub.string("mode", "affine") != "affine":
                raise ConfigError(f"{sub.name('mode')}: refpg reads MLX's affine quantization only")
            overrides.append((module, bits_and_group(sub)))
        elif value is not True:
            raise ConfigError(f"{q.name(module)} = {_short(value)}: a module's entry is an object with bits and "
                              f"group_size, or false")
    return Quantization(bits, group_size, tuple(overrides))


def load_config(model_dir: str) -> PaliGemmaConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(model_dir):
        raise ConfigError(f"model directory {model_dir!r} does not exist")
    if not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir!r} is a file, not a checkpoint directory "
                          f"(a directory with config.json, *.safetensors, tokenizer.model)")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: missing (a PaliGemma checkpoint directory has a config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise ConfigError(f"{path}: not valid JSON ({_why(e)})") from None
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _why(e: Exception) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)
