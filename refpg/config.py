"""Model configuration: read a published (sparse) `config.json` and fill in every omitted field.

Published PaliGemma configs list only what differs from the defaults of transformers' config
classes (`SiglipVisionConfig`, `GemmaConfig`, `Gemma2Config`); the defaults below are those.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

# Activations that are the tanh approximation of gelu, by the names configs use for it.
# ("gelu" in a Gemma config is a legacy name for the tanh approximation; transformers maps it too.)
GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new")


class ConfigError(ValueError):
    """config.json is missing, unreadable or describes a model refpg does not implement."""


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
class PaliGemmaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 256000
    projection_dim: int = 2048
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    tie_word_embeddings: bool = True

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


def _get(d: dict, key: str, default, kind):
    value = d.get(key)
    if value is None:
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field {key!r} = {value!r} is not a valid {kind.__name__}") from None


def vision_config_from_dict(d: dict) -> VisionConfig:
    model_type = d.get("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
        raise ConfigError(f"vision_config.model_type {model_type!r} is not supported (expected siglip_vision_model)")
    base = VisionConfig()
    fields = {name: _get(d, name, getattr(base, name), type(getattr(base, name)))
              for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "num_channels", "image_size", "patch_size", "layer_norm_eps", "hidden_act")}
    cfg = VisionConfig(**fields)
    if cfg.hidden_act not in GELU_TANH_NAMES:
        raise ConfigError(f"vision_config.hidden_act {cfg.hidden_act!r} is not supported "
                          f"(refpg implements {', '.join(GELU_TANH_NAMES)})")
    if cfg.num_channels != 3:
        raise ConfigError(f"vision_config.num_channels must be 3, got {cfg.num_channels}")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"vision_config.image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError("vision_config.hidden_size is not a multiple of num_attention_heads")
    return cfg


def text_config_from_dict(d: dict) -> TextConfig:
    model_type = d.get("model_type", "gemma")
    if model_type == "gemma":
        defaults = _GEMMA_DEFAULTS
    elif model_type == "gemma2":
        defaults = _GEMMA2_DEFAULTS
    else:
        raise ConfigError(f"text_config.model_type {model_type!r} is not supported (expected gemma or gemma2)")
    fields: dict = {"model_type": model_type}
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "head_dim", "max_position_embeddings"):
        fields[name] = _get(d, name, defaults[name], int)
    fields["rms_norm_eps"] = _get(d, "rms_norm_eps", defaults["rms_norm_eps"], float)
    # transformers' Gemma MLP reads hidden_act, Gemma 2's reads hidden_activation (each ignores the
    # other). In a Gemma (1) config, legacy "gelu" means the tanh approximation (transformers maps
    # it); in Gemma 2 it is the exact erf gelu, which refpg does not implement.
    act = d.get("hidden_act" if model_type == "gemma" else "hidden_activation") or defaults["hidden_act"]
    if act == "gelu" and model_type == "gemma":
        act = "gelu_pytorch_tanh"
    if act not in GELU_TANH_NAMES:
        raise ConfigError(f"text_config activation {act!r} is not supported (refpg implements {', '.join(GELU_TANH_NAMES)})")
    fields["hidden_act"] = act
    # Newer configs nest rope_theta in rope_parameters.
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    fields["rope_theta"] = _get(rope, "rope_theta", _get(d, "rope_theta", defaults["rope_theta"], float), float)
    # An omitted kv-head count means plain multi-head attention.
    fields["num_key_value_heads"] = _get(d, "num_key_value_heads",
                                         defaults.get("num_key_value_heads", fields["num_attention_heads"]), int)
    if model_type == "gemma2":
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            fields[name] = float(d[name]) if name in d and d[name] is not None else (
                None if name in d else float(defaults[name]))
        fields["sliding_window"] = _get(d, "sliding_window", defaults["sliding_window"], int)
        layer_types = d.get("layer_types")
        if layer_types is None:  # transformers' Gemma2Config: even layers slide, odd layers see everything
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(fields["num_hidden_layers"])]
        if len(layer_types) != fields["num_hidden_layers"] or not set(layer_types) <= {"sliding_attention", "full_attention"}:
            raise ConfigError(f"text_config.layer_types must list sliding_attention/full_attention for each of "
                              f"{fields['num_hidden_layers']} layers, got {layer_types!r}")
        fields["layer_types"] = tuple(layer_types)
    cfg = TextConfig(**fields)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"text_config.num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                          f"num_key_value_heads {cfg.num_key_value_heads}")
    if cfg.head_dim % 2:
        raise ConfigError(f"text_config.head_dim must be even for RoPE, got {cfg.head_dim}")
    return cfg


# What transformers' PaliGemmaConfig builds when a sub-config is absent altogether (PaliGemma-3B).
_ABSENT_VISION = dict(intermediate_size=4096, hidden_size=1152, patch_size=14, image_size=224,
                      num_hidden_layers=27, num_attention_heads=16)
_ABSENT_TEXT = dict(hidden_size=2048, num_hidden_layers=18, intermediate_size=16384, num_attention_heads=8,
                    num_key_value_heads=1, vocab_size=257152)


def config_from_dict(d: dict) -> PaliGemmaConfig:
    if d.get("model_type", "paligemma") != "paligemma":
        raise ConfigError(f"model_type {d.get('model_type')!r} is not a PaliGemma model (expected 'paligemma')")
    vision = vision_config_from_dict(d["vision_config"] if d.get("vision_config") is not None else _ABSENT_VISION)
    text = text_config_from_dict(d["text_config"] if d.get("text_config") is not None else _ABSENT_TEXT)
    text_defaults = d.get("text_config") or {}
    # Old configs keep ids at the top level; transformers reads them from text_config too.
    def token_id(name, default):
        value = text_defaults.get(name, d.get(name))
        if isinstance(value, list):  # some configs list several eos ids; the first is <eos>
            value = value[0] if value else None
        return _get({name: value}, name, default, int)
    return PaliGemmaConfig(
        vision=vision,
        text=text,
        image_token_index=_get(d, "image_token_index", _get(d, "image_token_id", 256000, int), int),
        projection_dim=_get(d, "projection_dim", 2048, int),
        pad_token_id=token_id("pad_token_id", 0),
        eos_token_id=token_id("eos_token_id", 1),
        bos_token_id=token_id("bos_token_id", 2),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
    )


def load_config(model_dir: str) -> PaliGemmaConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ConfigError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: missing (a PaliGemma checkpoint directory has a config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
