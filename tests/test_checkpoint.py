"""The checkpoint loader (refpg.weights.load_weights, refpg.safetensors_io.SafetensorsFile) on tiny
checkpoints written here with the safetensors library: dtypes, shards, namings, and every error path."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from refpg.formats import Format, Matrix
from refpg.config import config_from_dict, load_config
from refpg.safetensors_io import CheckpointError, SafetensorsFile
from refpg.weights import LM_HEAD, PROJECTOR, TEXT, VISION, Weights, expected_shapes, load_weights

safetensors_numpy = pytest.importorskip("safetensors.numpy")

CONFIG = {
    "model_type": "paligemma", "image_token_index": 39, "projection_dim": 16, "hidden_size": 16,
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8, "intermediate_size": 12,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 4, "image_size": 8},
    "text_config": {"model_type": "gemma", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 40},
}
CFG = config_from_dict(CONFIG)

# SigLIP's pooling head, which PaliGemma does not use (transformers 5 writes it when vision_use_head)
HEAD_SHAPES = {"probe": (1, 1, 8), "attention.in_proj_weight": (24, 8), "layernorm.weight": (8,),
               "mlp.fc1.weight": (12, 8)}

# hub prefix -> prefix in each naming
NAMINGS = {
    "hub": {},
    "new": {VISION: "model.vision_tower.vision_model.", TEXT: "model.language_model.",
            PROJECTOR: "model.multi_modal_projector.linear."},
    "tf5-save": {VISION: "vision_tower."},  # transformers 5's save_pretrained: no `vision_model.`
}


def hub_tensors(seed: int = 0, head: bool = False) -> dict[str, np.ndarray]:
    """Random float32 tensors for every name the tiny config needs, by hub name."""
    rng = np.random.default_rng(seed)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in expected_shapes(CFG).items()}
    if head:
        tensors.update({VISION + "head." + k: rng.standard_normal(s).astype(np.float32) for k, s in HEAD_SHAPES.items()})
    return tensors


def renamed(tensors: dict, naming: str) -> dict:
    out = {}
    for name, value in tensors.items():
        for hub, new in NAMINGS[naming].items():
            if name.startswith(hub):
                name = new + name[len(hub):]
                break
        out[name] = value
    return out


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_checkpoint(model_dir, tensors: dict, dtype: str = "F32", shards: int = 1, config: dict = CONFIG) -> str:
    """A hub-like directory: config.json + model.safetensors, or shards + model.safetensors.index.json."""
    model_dir = str(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f)
    if dtype == "BF16":
        torch = pytest.importorskip("torch")
        from safetensors.torch import save_file

        def save(part, path):
            save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in part.items()}, path)
    else:
        np_dtype = {"F32": np.float32, "F16": np.float16}[dtype]

        def save(part, path):
            safetensors_numpy.save_file({k: np.ascontiguousarray(v, np_dtype) for k, v in part.items()}, path)

    if shards == 1:
        save(tensors, os.path.join(model_dir, "model.safetensors"))
        return model_dir
    names, files = sorted(tensors), shard_names(shards)
    weight_map = {name: files[i % shards] for i, name in enumerate(names)}
    for file in files:
        save({n: tensors[n] for n in names if weight_map[n] == file}, os.path.join(model_dir, file))
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return model_dir


def load(model_dir) -> Weights:
    return load_weights(str(model_dir), load_config(str(model_dir)))


def f32(m: Matrix) -> np.ndarray:
    """A matrix loaded with the default matrix_dtype: float32, as stored."""
    assert m.format is Format.F32
    return m.data


def weights_by_hub(w: Weights) -> dict[str, np.ndarray]:
    """Where each hub tensor should have landed in the Weights dataclasses."""
    v = CFG.vision
    out = {
        VISION + "embeddings.patch_embedding.weight": f32(w.vision.patch_embedding.weight).reshape(
            v.hidden_size, 3, v.patch_size, v.patch_size),
        VISION + "embeddings.patch_embedding.bias": w.vision.patch_embedding.bias,
        VISION + "embeddings.position_embedding.weight": w.vision.position_embedding,
        VISION + "post_layernorm.weight": w.vision.post_layernorm.weight,
        VISION + "post_layernorm.bias": w.vision.post_layernorm.bias,
        PROJECTOR + "weight": f32(w.projector.weight), PROJECTOR + "bias": w.projector.bias,
        TEXT + "embed_tokens.weight": f32(w.text.embed_tokens), TEXT + "norm.weight": w.text.norm.weight,
    }
    for i, layer in enumerate(w.vision.layers):
        p = f"{VISION}encoder.layers.{i}."
        for name in ("layer_norm1", "layer_norm2"):
            out[p + name + ".weight"], out[p + name + ".bias"] = getattr(layer, name).weight, getattr(layer, name).bias
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lin = getattr(layer, name)
            out[p + f"self_attn.{name}.weight"], out[p + f"self_attn.{name}.bias"] = f32(lin.weight), lin.bias
        for name in ("fc1", "fc2"):
            lin = getattr(layer, name)
            out[p + f"mlp.{name}.weight"], out[p + f"mlp.{name}.bias"] = f32(lin.weight), lin.bias
    for i, layer in enumerate(w.text.layers):
        p = f"{TEXT}layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{name}.weight"] = f32(getattr(layer, name).weight)
            assert getattr(layer, name).bias is None
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[p + f"mlp.{name}.weight"] = f32(getattr(layer, name).weight)
        assert layer.pre_feedforward_layernorm is None and layer.post_feedforward_layernorm is None
    assert w.text.lm_head is w.text.embed_tokens
    assert len(out) == len(expected_shapes(CFG))
    return out


def assert_weights_equal(w: Weights, expected: dict[str, np.ndarray]) -> None:
    loaded = weights_by_hub(w)
    assert sorted(loaded) == sorted(n for n in expected if ".head." not in n)
    for name, array in loaded.items():
        assert array.dtype == np.float32, name
        np.testing.assert_array_equal(array, expected[name], err_msg=name)


# ---- loading --------------------------------------------------------------------------------

def test_f32_tensors_load_as_memory_maps_with_stored_values(tmp_path):
    tensors = hub_tensors()
    w = load(write_checkpoint(tmp_path, tensors))
    assert_weights_equal(w, tensors)
    for name, array in weights_by_hub(w).items():
        assert isinstance(array, np.memmap), f"{name} was copied"
        assert not array.flags.writeable, name


@pytest.mark.parametrize("shards", [1, 3])
def test_bf16_shards_load_like_f32(tmp_path, shards):
    torch = pytest.importorskip("torch")
    tensors = hub_tensors()
    rounded = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in tensors.items()}
    assert any((rounded[k] != tensors[k]).any() for k in tensors)  # the rounding is real
    bf16 = load(write_checkpoint(tmp_path / "bf16", tensors, dtype="BF16", shards=shards))
    f32 = load(write_checkpoint(tmp_path / "f32", rounded))
    assert_weights_equal(bf16, rounded)
    assert_weights_equal(f32, rounded)


@pytest.mark.parametrize("shards", [1, 2])
def test_f16_shards_load_like_f32(tmp_path, shards):
    tensors = hub_tensors()
    rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in tensors.items()}
    assert_weights_equal(load(write_checkpoint(tmp_path / "f16", tensors, dtype="F16", shards=shards)), rounded)
    assert_weights_equal(load(write_checkpoint(tmp_path / "f32", rounded)), rounded)


@pytest.mark.parametrize("shards", [2, 5])
def test_sharded_checkpoint_with_index_loads_like_single_file(tmp_path, shards):
    tensors = hub_tensors()
    sharded = load(write_checkpoint(tmp_path / "sharded", tensors, shards=shards))
    single = load(write_checkpoint(tmp_path / "single", tensors))
    assert_weights_equal(sharded, tensors)
    for name, array in weights_by_hub(single).items():
        np.testing.assert_array_equal(weights_by_hub(sharded)[name], array)


@pytest.mark.parametrize("naming", ["hub", "new", "tf5-save"])
@pytest.mark.parametrize("shards", [1, 2])
def test_all_three_namings_load_identically(tmp_path, naming, shards):
    tensors = hub_tensors(head=True)  # the pooling head is there too, and ignored
    stored = renamed(tensors, naming)
    if naming == "new":
        stored[LM_HEAD] = tensors[TEXT + "embed_tokens.weight"]
    assert_weights_equal(load(write_checkpoint(tmp_path, stored, shards=shards)), tensors)


def test_vision_pooling_head_tensors_are_ignored(tmp_path):
    tensors = hub_tensors(head=True)
    assert any(".head." in n for n in tensors)
    assert_weights_equal(load(write_checkpoint(tmp_path, tensors)), tensors)


def test_lm_head_is_the_embedding_when_tied(tmp_path):
    tensors = hub_tensors()
    tensors[LM_HEAD] = np.zeros_like(tensors[TEXT + "embed_tokens.weight"])  # a stored copy is unused
    w = load(write_checkpoint(tmp_path, tensors))
    assert w.text.lm_head is w.text.embed_tokens
    np.testing.assert_array_equal(f32(w.text.lm_head), tensors[TEXT + "embed_tokens.weight"])


# transformers reads the LM head under both names (transformers 4 saved it inside `language_model.`)
@pytest.mark.parametrize("name", [LM_HEAD, "language_model.lm_head.weight"])
def test_untied_lm_head_is_read_from_the_checkpoint_under_either_name(tmp_path, name):
    tensors = hub_tensors()
    tensors[name] = tensors[TEXT + "embed_tokens.weight"] * 2
    w = load(write_checkpoint(tmp_path, tensors, config={**CONFIG, "tie_word_embeddings": False}))
    np.testing.assert_array_equal(f32(w.text.lm_head), tensors[name])


def test_untied_config_without_lm_head_names_it(tmp_path):
    d = write_checkpoint(tmp_path, hub_tensors(), config={**CONFIG, "tie_word_embeddings": False})
    with pytest.raises(CheckpointError, match=LM_HEAD.replace(".", r"\.")):
        load(d)


def test_progress_counts_every_tensor(tmp_path):
    d = write_checkpoint(tmp_path, hub_tensors())
    calls = []
    load_weights(d, load_config(d), progress=lambda done, total: calls.append((done, total)))
    n = len(expected_shapes(CFG))
    assert calls == [(i, n) for i in range(1, n + 1)]


# ---- errors: the checkpoint does not fit the model -----------------------------------------

def error_of(model_dir) -> str:
    with pytest.raises(CheckpointError) as e:
        load(model_dir)
    assert isinstance(e.value, ValueError)
    return str(e.value)


def test_no_weights_file_names_the_directory(tmp_path):
    d = write_checkpoint(tmp_path, hub_tensors())
    os.remove(os.path.join(d, "model.safetensors"))
    msg = error_of(d)
    assert d in msg and "model.safetensors" in msg


def test_index_pointing_at_missing_shard_names_it(tmp_path):
    d = write_checkpoint(tmp_path, hub_tensors(), shards=3)
    os.remove(os.path.join(d, shard_names(3)[1]))
    msg = error_of(d)
    assert shard_names(3)[1] in msg and "missing" in msg


def test_index_listing_tensor_absent_from_its_shard_names_both(tmp_path):
    d = write_checkpoint(tmp_path, hub_tensors(), shards=2)
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f:
        content = json.load(f)
    content["weight_map"]["language_model.model.ghost.weight"] = shard_names(2)[0]
    with open(index, "w") as f:
        json.dump(content, f)
    msg = error_of(d)
    assert "language_model.model.ghost.weight" in msg and shard_names(2)[0] in msg


def test_index_that_is_not_json_names_it(tmp_path):
    d = write_checkpoint(tmp_path, hub_tensors(), shards=2)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": ')
    assert "model.safetensors.index.json" in error_of(d)


def test_missing_tensor_is_named(tmp_path):
    tensors = hub_tensors()
    del tensors[TEXT + "norm.weight"]
    msg = error_of(write_checkpoint(tmp_path, tensors))
    assert TEXT + "norm.weight" in msg and "lacks" in msg


def test_extra_unexpected_tensor_is_named_with_its_file(tmp_path):
    tensors = hub_tensors()
    tensors[TEXT + "layers.1.mlp.up_proj.weight"] = np.zeros((24, 16), np.float32)  # a layer the config lacks
    d = write_checkpoint(tmp_path, tensors)
    msg = error_of(d)
    assert TEXT + "layers.1.mlp.up_proj.weight" in msg and os.path.join(d, "model.safetensors") in msg


def test_mis_shaped_tensor_is_named_with_both_shapes(tmp_path):
    tensors = hub_tensors()
    name = TEXT + "layers.0.self_attn.k_proj.weight"
    tensors[name] = np.zeros((16, 16), np.float32)  # 2 kv heads' worth, the config says 1: [8, 16]
    d = write_checkpoint(tmp_path, tensors)
    msg = error_of(d)
    assert name in msg and "[16, 16]" in msg and "[8, 16]" in msg and os.path.join(d, "model.safetensors") in msg


def test_same_weight_in_two_namings_is_an_error(tmp_path):
    tensors = hub_tensors()
    tensors["model.language_model.norm.weight"] = tensors[TEXT + "norm.weight"]
    msg = error_of(write_checkpoint(tmp_path, tensors))
    assert "model.language_model.norm.weight" in msg and "duplicates" in msg


def test_integer_tensor_for_a_weight_is_named(tmp_path):
    tensors = hub_tensors()
    d = write_checkpoint(tmp_path, tensors)
    tensors[TEXT + "norm.weight"] = np.arange(16, dtype=np.int32)
    safetensors_numpy.save_file(tensors, os.path.join(d, "model.safetensors"))
    assert TEXT + "norm.weight" in error_of(d)


# ---- errors: the file itself is broken ------------------------------------------------------

def write_raw(path, header, data: bytes = b"", header_len: int | None = None) -> str:
    """A safetensors file byte by byte: 8-byte length, header (dict or raw bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return str(path)


def valid_checkpoint(tmp_path) -> tuple[str, str]:
    d = write_checkpoint(tmp_path, hub_tensors())
    return d, os.path.join(d, "model.safetensors")


@pytest.mark.parametrize("shards", [1, 2])
def test_file_truncated_mid_data_is_named(tmp_path, shards):
    d = write_checkpoint(tmp_path, hub_tensors(), shards=shards)
    path = os.path.join(d, "model.safetensors" if shards == 1 else shard_names(2)[1])
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[:-10])
    msg = error_of(d)
    assert path in msg and "truncated" in msg


def test_file_truncated_inside_header_is_named(tmp_path):
    d, path = valid_checkpoint(tmp_path)
    with open(path, "rb") as f:
        content = f.read()
    (n,) = struct.unpack("<Q", content[:8])
    with open(path, "wb") as f:
        f.write(content[: 8 + n // 2])
    assert path in error_of(d)


def test_header_that_is_not_json_is_named(tmp_path):
    d, path = valid_checkpoint(tmp_path)
    write_raw(path, b"{this is not json}", b"\0" * 64)
    msg = error_of(d)
    assert path in msg and "JSON" in msg


def test_header_that_is_not_an_object_is_named(tmp_path):
    d, path = valid_checkpoint(tmp_path)
    write_raw(path, [1, 2, 3])
    assert path in error_of(d)


def test_header_length_larger_than_file_is_named(tmp_path):
    d, path = valid_checkpoint(tmp_path)
    write_raw(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, header_len=10**6)
    msg = error_of(d)
    assert path in msg and "header length" in msg


def test_data_offsets_inconsistent_with_shape_are_named(tmp_path):
    d, path = valid_checkpoint(tmp_path)
    write_raw(path, {TEXT + "norm.weight": {"dtype": "F32", "shape": [16], "data_offsets": [0, 60]}}, b"\0" * 64)
    msg = error_of(d)
    assert path in msg and TEXT + "norm.weight" in msg and "data_offsets" in msg


@pytest.mark.parametrize("offsets", [[8, 4], [-4, 0]])
def test_reversed_or_negative_data_offsets_are_named(tmp_path, offsets):
    path = write_raw(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}},
                     b"\0" * 8)
    with pytest.raises(CheckpointError, match="'w'") as e:
        SafetensorsFile(path)
    assert path in str(e.value)


def test_unsupported_dtype_is_named(tmp_path):
    d, path = valid_checkpoint(tmp_path)
    write_raw(path, {TEXT + "norm.weight": {"dtype": "F8_E4M3", "shape": [16], "data_offsets": [0, 16]}},
              b"\0" * 16)
    msg = error_of(d)
    assert path in msg and TEXT + "norm.weight" in msg and "F8_E4M3" in msg


def test_malformed_header_entry_is_named(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match="malformed") as e:
        SafetensorsFile(path)
    assert path in str(e.value) and "'w'" in str(e.value)


def test_empty_file_is_named(tmp_path):
    d, path = valid_checkpoint(tmp_path)
    open(path, "wb").close()
    msg = error_of(d)
    assert path in msg and "truncated" in msg


def test_safetensors_file_reads_header_metadata_and_empty_tensors(tmp_path):
    path = str(tmp_path / "x.safetensors")
    safetensors_numpy.save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "e": np.zeros((0, 4), np.float32)},
                                path, metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"} and sorted(f.keys()) == ["a", "e"]
    assert (f.dtype("a"), f.shape("a"), f.shape("e")) == ("F32", (2, 3), (0, 4))
    np.testing.assert_array_equal(f.float32("a"), np.arange(6).reshape(2, 3))
    assert f.float32("e").shape == (0, 4)


# ---- header validation bugs (documented, see reasons) ---------------------------------------

def open_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        f = SafetensorsFile(path)
        for name in f.keys():
            f.float32(name)
    return str(e.value)


def test_string_data_offsets_are_a_checkpoint_error(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}},
                     b"\0" * 8)
    assert path in open_error(path)


def test_float_data_offsets_are_a_checkpoint_error(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}},
                     b"\0" * 8)
    assert path in open_error(path)


def test_negative_dimensions_are_a_checkpoint_error_naming_the_file(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}},
                     b"\0" * 8)
    assert path in open_error(path)


# ---- the format's tiling rule, sizes beyond int64, hostile headers ------------------------

@pytest.mark.parametrize("offsets_b, words", [
    ([4, 12], "overlaps"),         # b starts inside a
    ([12, 20], "hole of 4 bytes"),  # 4 bytes between a and b
])
def test_overlapping_or_gapped_tensors_are_named(tmp_path, offsets_b, words):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": offsets_b}}
    path = write_raw(tmp_path / "x.safetensors", header, b"\0" * offsets_b[1])
    msg = open_error(path)
    assert path in msg and "'b'" in msg and words in msg


def test_bytes_after_the_last_tensor_are_named(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                     b"\0" * 12)
    msg = open_error(path)
    assert path in msg and "4 bytes after the last tensor" in msg


def test_shape_beyond_int64_is_a_checkpoint_error(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 8]}}
    path = write_raw(tmp_path / "x.safetensors", header, b"\0" * 8)
    msg = open_error(path)
    assert path in msg and "'w'" in msg and "data_offsets" in msg


def test_deeply_nested_header_is_a_checkpoint_error(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", b"[" * 100_000 + b"]" * 100_000)
    msg = open_error(path)
    assert path in msg and "nested too deeply" in msg


@pytest.mark.parametrize("shard", [7, None, "", "../model.safetensors", ["a"]])
def test_index_mapping_a_tensor_to_something_not_a_shard_file_is_named(tmp_path, shard):
    d = write_checkpoint(tmp_path, hub_tensors(), shards=2)
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f:
        content = json.load(f)
    content["weight_map"][TEXT + "norm.weight"] = shard
    with open(index, "w") as f:
        json.dump(content, f)
    msg = error_of(d)
    assert index in msg and TEXT + "norm.weight" in msg


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_named_at_load(tmp_path, dtype, bad):
    tensors = hub_tensors()
    tensors[TEXT + "layers.0.mlp.up_proj.weight"][3, 5] = bad
    d = write_checkpoint(tmp_path, tensors, dtype=dtype)
    msg = error_of(d)
    assert TEXT + "layers.0.mlp.up_proj.weight" in msg and "NaN or infinite" in msg
    for matrix_dtype in ("bfloat16", "auto"):  # kept as bf16 bits too
        with pytest.raises(CheckpointError, match="up_proj"):
            load_weights(d, load_config(d), matrix_dtype=matrix_dtype)


def test_f32_value_beyond_bf16_range_is_named_when_rounded_to_bf16(tmp_path):
    tensors = hub_tensors()
    tensors[TEXT + "embed_tokens.weight"][1, 1] = np.finfo(np.float32).max  # rounds to bf16 inf
    d = write_checkpoint(tmp_path, tensors)
    load(d)  # as float32 it is a (huge) finite weight
    with pytest.raises(CheckpointError, match="embed_tokens.* beyond the range of bfloat16 .*weight_dtype='float32'"):
        load_weights(d, load_config(d), matrix_dtype="bfloat16")
