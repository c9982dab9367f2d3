"""refpg.config: sparse published configs get transformers' defaults; bad configs fail naming the file."""

from __future__ import annotations

import copy
import json

import pytest

from refpg.config import ConfigError, config_from_dict, load_config

# google/paligemma-3b-pt-224's config.json, as published (sparse)
PALIGEMMA_3B = {
    "architectures": ["PaliGemmaForConditionalGeneration"],
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "hidden_size": 2048, "ignore_index": -100,
    "image_token_index": 257152, "model_type": "paligemma", "projection_dim": 2048, "vocab_size": 257216,
    "text_config": {
        "hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma", "num_attention_heads": 8,
        "num_hidden_layers": 18, "num_image_tokens": 256, "num_key_value_heads": 1, "torch_dtype": "float32",
        "vocab_size": 257216,
    },
    "vision_config": {
        "hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
        "projection_dim": 2048, "torch_dtype": "float32",
    },
}

# google/paligemma2-3b-pt-224-like: a Gemma 2 text config, also sparse
PALIGEMMA2_3B = copy.deepcopy(PALIGEMMA_3B)
PALIGEMMA2_3B["text_config"] = {
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
    "model_type": "gemma2", "num_hidden_layers": 26, "num_image_tokens": 256, "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "vocab_size": 257216,
}
PALIGEMMA2_3B["hidden_size"] = PALIGEMMA2_3B["projection_dim"] = 2304


def with_text(**fields) -> dict:
    d = copy.deepcopy(PALIGEMMA_3B)
    d["text_config"].update(fields)
    return d


def write_config(tmp_path, content) -> str:
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "layer_norm_eps", "hidden_act")
GEMMA2_FIELDS = ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window")


def refpg_fields(cfg) -> dict:
    """Every field refpg fills, by name."""
    v, t = cfg.vision, cfg.text
    fields = {f"vision.{k}": getattr(v, k) for k in VISION_FIELDS}
    fields.update({f"text.{k}": getattr(t, k) for k in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "hidden_act",
        "max_position_embeddings")})
    if t.model_type == "gemma2":
        fields.update({f"text.{k}": getattr(t, k) for k in GEMMA2_FIELDS})
        fields["text.layer_types"] = list(t.layer_types)
    fields.update(image_token_index=cfg.image_token_index, projection_dim=cfg.projection_dim,
                  num_image_tokens=cfg.num_image_tokens, pad_token_id=cfg.pad_token_id,
                  eos_token_id=cfg.eos_token_id, bos_token_id=cfg.bos_token_id,
                  tie_word_embeddings=cfg.tie_word_embeddings)
    return fields


def transformers_fields(d: dict, model_type: str) -> dict:
    """The same fields, read from transformers.PaliGemmaConfig(**d)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PaliGemmaConfig(**copy.deepcopy(d))
    v, t = hf.vision_config, hf.text_config
    fields = {f"vision.{k}": getattr(v, k) for k in VISION_FIELDS}
    fields.update({f"text.{k}": getattr(t, k) for k in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings")})
    fields["text.rope_theta"] = t.rope_parameters["rope_theta"]
    fields["text.hidden_act"] = t.hidden_activation if model_type == "gemma2" else t.hidden_act
    if model_type == "gemma2":
        fields.update({f"text.{k}": getattr(t, k) for k in GEMMA2_FIELDS})
        fields["text.layer_types"] = list(t.layer_types)
    fields.update(image_token_index=hf.image_token_index, projection_dim=hf.projection_dim,
                  num_image_tokens=t.num_image_tokens, pad_token_id=t.pad_token_id,
                  eos_token_id=t.eos_token_id, bos_token_id=t.bos_token_id,
                  tie_word_embeddings=hf.tie_word_embeddings)
    return fields


# ---- defaults -------------------------------------------------------------------------------

def test_sparse_paligemma_3b_config_gets_gemma_and_siglip_defaults():
    cfg = config_from_dict(PALIGEMMA_3B)
    t, v = cfg.text, cfg.vision
    assert (t.head_dim, t.rms_norm_eps, t.rope_theta, t.hidden_act) == (256, 1e-6, 10000.0, "gelu_pytorch_tanh")
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (2048, 16384, 18)
    assert (t.num_attention_heads, t.num_key_value_heads, t.num_queries_per_kv) == (8, 1, 8)
    assert (t.vocab_size, t.max_position_embeddings, t.model_type) == (257216, 8192, "gemma")
    assert t.attn_logit_softcapping is t.final_logit_softcapping is t.sliding_window is t.layer_types is None
    assert (v.image_size, v.patch_size, v.num_patches, v.head_dim) == (224, 14, 256, 72)
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1152, 4304, 27, 16)
    assert (v.layer_norm_eps, v.hidden_act, v.num_channels) == (1e-6, "gelu_pytorch_tanh", 3)
    assert (cfg.num_image_tokens, cfg.image_token_index, cfg.projection_dim) == (256, 257152, 2048)
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id, cfg.tie_word_embeddings) == (0, 1, 2, True)


@pytest.mark.parametrize("d, model_type", [(PALIGEMMA_3B, "gemma"), (PALIGEMMA2_3B, "gemma2")],
                         ids=["paligemma-3b", "paligemma2-3b"])
def test_every_filled_field_matches_transformers(d, model_type):
    assert refpg_fields(config_from_dict(d)) == transformers_fields(d, model_type)


@pytest.mark.parametrize("extra", [
    {"rope_theta": 500.0}, {"rope_parameters": {"rope_type": "default", "rope_theta": 123.0}},
    {"hidden_act": "gelu"}, {"head_dim": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 512},
], ids=["rope_theta", "rope_parameters", "legacy-gelu", "explicit-fields"])
def test_variations_match_transformers(extra):
    d = with_text(**extra)
    assert refpg_fields(config_from_dict(d)) == transformers_fields(d, "gemma")


def test_omitted_kv_heads_means_multi_head_attention_unlike_transformers():
    # The one intended difference: transformers' GemmaConfig keeps its class default of 16 kv heads
    # (which would not even divide 8 query heads); refpg reads an omitted count as MHA.
    d = copy.deepcopy(PALIGEMMA_3B)
    del d["text_config"]["num_key_value_heads"]
    assert config_from_dict(d).text.num_key_value_heads == 8
    hf = transformers_fields(d, "gemma")
    assert hf["text.num_key_value_heads"] == 16


def test_gemma2_defaults_and_even_layers_slide():
    cfg = config_from_dict({"projection_dim": 2304, "text_config": {"model_type": "gemma2", "num_hidden_layers": 5}})
    t = cfg.text
    assert (t.head_dim, t.rms_norm_eps, t.rope_theta, t.hidden_act) == (256, 1e-6, 10000.0, "gelu_pytorch_tanh")
    assert (t.num_attention_heads, t.num_key_value_heads) == (8, 4)
    assert (t.attn_logit_softcapping, t.final_logit_softcapping) == (50.0, 30.0)
    assert (t.query_pre_attn_scalar, t.sliding_window) == (256, 4096)
    assert t.layer_types == ("sliding_attention", "full_attention", "sliding_attention", "full_attention",
                             "sliding_attention")


def test_gemma2_explicit_layer_types_and_null_softcaps_are_kept():
    cfg = config_from_dict({"projection_dim": 2304, "text_config": {
        "model_type": "gemma2", "num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"],
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "sliding_window": 512}})
    assert cfg.text.layer_types == ("full_attention", "sliding_attention")
    assert cfg.text.attn_logit_softcapping is None and cfg.text.final_logit_softcapping is None
    assert cfg.text.sliding_window == 512


def test_rope_parameters_form_sets_rope_theta():
    cfg = config_from_dict(with_text(rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    assert cfg.text.rope_theta == 500.0
    assert config_from_dict(with_text(rope_parameters={"rope_theta": 7.0})).text.rope_theta == 7.0


@pytest.mark.parametrize("model_type", ["gemma", "gemma2"])
def test_legacy_gelu_hidden_act_means_tanh_approximation(model_type):
    cfg = config_from_dict(with_text(model_type=model_type, hidden_act="gelu"))
    assert cfg.text.hidden_act == "gelu_pytorch_tanh"


def test_image_tokens_follow_image_and_patch_size():
    d = copy.deepcopy(PALIGEMMA_3B)
    d["vision_config"]["image_size"] = 448
    assert config_from_dict(d).num_image_tokens == 1024


def test_load_config_reads_config_json(tmp_path):
    write_config(tmp_path, PALIGEMMA_3B)
    assert load_config(str(tmp_path)) == config_from_dict(PALIGEMMA_3B)


# ---- known differences from transformers ----------------------------------------------------

def test_absent_sub_configs_get_paligemma_defaults_like_transformers():
    d = {"model_type": "paligemma"}
    assert refpg_fields(config_from_dict(d)) == transformers_fields(d, "gemma")


def test_gemma2_exact_gelu_activation_is_rejected_not_silently_tanh():
    with pytest.raises(ConfigError):
        config_from_dict(with_text(model_type="gemma2", hidden_activation="gelu"))


# ---- errors ---------------------------------------------------------------------------------

def test_missing_directory_is_a_config_error_naming_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_config(missing)
    assert missing in str(e.value)
    assert issubclass(ConfigError, ValueError)


def test_missing_config_json_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing") as e:
        load_config(str(tmp_path))
    assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("content", ['{"model_type": "paligemma",', "", "\xff\xfe", "[1, 2]"],
                         ids=["truncated", "empty", "not-utf8", "not-an-object"])
def test_invalid_json_names_the_file(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("d, words", [
    ({**PALIGEMMA_3B, "model_type": "llava"}, "llava"),
    (with_text(model_type="llama"), "llama"),
    ({**PALIGEMMA_3B, "vision_config": {**PALIGEMMA_3B["vision_config"], "model_type": "clip_vision_model"}},
     "clip_vision_model"),
], ids=["top-level", "text", "vision"])
def test_wrong_model_type_names_the_file_and_type(tmp_path, d, words):
    path = write_config(tmp_path, d)
    with pytest.raises(ConfigError, match=words) as e:
        load_config(str(tmp_path))
    assert path in str(e.value)


@pytest.mark.parametrize("d", [
    with_text(hidden_act="relu"), with_text(model_type="gemma2", hidden_activation="silu"),
    {**PALIGEMMA_3B, "vision_config": {**PALIGEMMA_3B["vision_config"], "hidden_act": "quick_gelu"}},
], ids=["gemma-relu", "gemma2-silu", "vision-quick_gelu"])
def test_unsupported_activation_names_the_file(tmp_path, d):
    path = write_config(tmp_path, d)
    with pytest.raises(ConfigError, match="not supported") as e:
        load_config(str(tmp_path))
    assert path in str(e.value)


def test_heads_not_a_multiple_of_kv_heads_names_the_file(tmp_path):
    path = write_config(tmp_path, with_text(num_attention_heads=8, num_key_value_heads=3))
    with pytest.raises(ConfigError, match="num_key_value_heads 3") as e:
        load_config(str(tmp_path))
    assert path in str(e.value)


@pytest.mark.parametrize("d", [
    with_text(head_dim=7),
    with_text(hidden_size="wide"),
    with_text(rope_parameters={"rope_type": "linear", "rope_theta": 1.0, "factor": 2.0}),
    with_text(model_type="gemma2", num_hidden_layers=2, layer_types=["sliding_attention"]),
    {**PALIGEMMA_3B, "vision_config": {**PALIGEMMA_3B["vision_config"], "image_size": 225}},
], ids=["odd-head_dim", "non-int", "scaled-rope", "layer_types-length", "image-not-patch-multiple"])
def test_other_unsupported_configs_name_the_file(tmp_path, d):
    path = write_config(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path))
    assert path in str(e.value)


# ---- every field checked for type and range, naming it ----------------------------------------

def with_vision(**fields) -> dict:
    d = copy.deepcopy(PALIGEMMA_3B)
    d["vision_config"].update(fields)
    return d


def with_top(**fields) -> dict:
    return {**copy.deepcopy(PALIGEMMA_3B), **fields}


BAD_FIELDS = [
    (with_text(hidden_size=64.7), "text_config.hidden_size = 64.7 is not an integer"),
    (with_text(hidden_size="2048"), "text_config.hidden_size = \"2048\" is not an integer"),
    (with_text(hidden_size=True), "text_config.hidden_size = true is not an integer"),
    (with_text(hidden_size=[2048]), "text_config.hidden_size = [2048] is not an integer"),
    (with_text(intermediate_size=0), "text_config.intermediate_size = 0 is out of range"),
    (with_text(vocab_size=-5), "text_config.vocab_size = -5 is out of range"),
    (with_text(num_hidden_layers=10 ** 9), "text_config.num_hidden_layers = 1000000000 is out of range"),
    (with_vision(num_hidden_layers=10 ** 9), "vision_config.num_hidden_layers = 1000000000 is out of range"),
    (with_text(model_type="gemma2", num_hidden_layers=10 ** 9), "text_config.num_hidden_layers"),
    (with_text(num_attention_heads=0), "text_config.num_attention_heads = 0 is out of range"),
    (with_vision(num_attention_heads=0), "vision_config.num_attention_heads = 0 is out of range"),
    (with_vision(patch_size=0), "vision_config.patch_size = 0 is out of range"),
    (with_vision(image_size=10 ** 30), "vision_config.image_size = 1000000000000000000000000000000 is out of range"),
    (with_vision(num_channels=1), "vision_config.num_channels = 1 is out of range [3, 3]"),
    (with_text(head_dim=1.5), "text_config.head_dim = 1.5 is not an integer"),
    (with_text(rms_norm_eps=-1e-6), "text_config.rms_norm_eps = -1e-06 must be a finite number > 0"),
    (with_vision(layer_norm_eps="1e-6"), "vision_config.layer_norm_eps = \"1e-6\" is not a number"),
    (with_text(rope_theta=0), "text_config.rope_theta = 0 must be a finite number > 0"),
    (with_text(rope_parameters={"rope_theta": float("inf")}), "text_config.rope_parameters.rope_theta = inf"),
    (with_text(rope_parameters=[10000]), "text_config.rope_parameters must be a JSON object, got a list"),
    (with_text(max_position_embeddings=0), "text_config.max_position_embeddings = 0 is out of range"),
    (with_text(max_position_embeddings=100), "max_position_embeddings 100 cannot hold the 256 image tokens"),
    (with_text(model_type="gemma2", attn_logit_softcapping="50"),
     "text_config.attn_logit_softcapping = \"50\" is not a number"),
    (with_text(model_type="gemma2", query_pre_attn_scalar=-256), "text_config.query_pre_attn_scalar = -256"),
    (with_text(model_type="gemma2", sliding_window=0), "text_config.sliding_window = 0 is out of range"),
    (with_text(model_type="gemma2", num_hidden_layers=2, layer_types="sliding_attention"),
     "text_config.layer_types must list"),
    (with_text(model_type="gemma2", num_hidden_layers=2, layer_types=[1, 2]), "text_config.layer_types must list"),
    (with_text(hidden_act=["gelu"]), "text_config.hidden_act = [\"gelu\"] is not a string"),
    (with_text(model_type=3), "text_config.model_type = 3 is not a string"),
    (with_top(vision_config=[1, 2]), "vision_config must be a JSON object, got a list"),
    (with_top(text_config="gemma"), "text_config must be a JSON object, got a string"),
    (with_top(tie_word_embeddings="false"), "tie_word_embeddings = \"false\" is not true or false"),
    (with_top(image_token_index=-1), "image_token_index = -1 is out of range"),
    (with_top(image_token_index="257152"), "image_token_index = \"257152\" is not an integer"),
    (with_top(eos_token_id=10 ** 6), "eos_token_id = 1000000 is out of range [0, 257215]"),
    (with_text(bos_token_id=-2), "text_config.bos_token_id = -2 is out of range"),
    (with_text(eos_token_id=[1.5, 107]), "text_config.eos_token_id = 1.5 is not an integer"),
    (with_top(projection_dim=1024), "projection_dim 1024 differs from text_config.hidden_size 2048"),
    (with_top(model_type=["paligemma"]), "model_type = [\"paligemma\"] is not a string"),
]


@pytest.mark.parametrize("d, message", BAD_FIELDS, ids=[m.split(" ")[0] + "|" + m.split(" = ")[-1][:20]
                                                        for _, m in BAD_FIELDS])
def test_a_field_of_the_wrong_type_or_range_is_a_config_error_naming_it(tmp_path, d, message):
    path = write_config(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path))
    assert path in str(e.value) and message in str(e.value)


def test_integral_floats_are_integers_and_false_unties_the_head():
    cfg = config_from_dict({**with_text(hidden_size=2048.0, num_hidden_layers=18.0), "tie_word_embeddings": False})
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers) == (2048, 18)
    assert isinstance(cfg.text.hidden_size, int) and cfg.tie_word_embeddings is False


def test_a_billion_layers_fails_at_once_not_when_memory_runs_out():
    import time

    start = time.perf_counter()
    with pytest.raises(ConfigError):
        config_from_dict(with_text(model_type="gemma2", num_hidden_layers=10 ** 9))
    assert time.perf_counter() - start < 1.0


def test_model_given_a_file_says_it_is_a_file(tmp_path):
    path = write_config(tmp_path, PALIGEMMA_3B)
    with pytest.raises(ConfigError, match="is a file"):
        load_config(path)
