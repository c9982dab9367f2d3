"""`refpg quantize`: a checkpoint in MLX's affine quantization, as mlx-vlm's `convert` writes it.

What mlx-vlm (0.7) does, done the same way so that its output and refpg's are the same bytes
(tests/test_quantized.py holds them to it) and each loads in the other:
- the text model's linear layers and its embedding table (the tied LM head) are quantized
  (refpg.formats.quantize) when their size is a multiple of 64 and their rows split into groups;
  the vision tower and the projector stay as they are (mlx-vlm skips multimodal modules);
- values are taken in the model's dtype: config.json's torch_dtype when it names one, else each
  tensor's own; scales and biases are stored in that dtype, the other tensors keep it;
- tensors are written under the hub's names, the patch embedding channel-last [D, P, P, 3] (MLX's
  convolution layout), safetensors files of at most 5 GB (more than one: with an index);
- config.json gains "quantization" (and its copy "quantization_config"):
  {"group_size": g, "bits": b, "mode": "affine"}; the other files of the directory are copied.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable

import numpy as np

from refpg.config import load_config
from refpg.errors import ConfigError, InputError
from refpg.formats import AFFINE_BITS, AFFINE_GROUP_SIZES, SAFETENSORS_FORMATS, f32_to_bf16, quantize, round_to
from refpg.safetensors_io import write_safetensors
from refpg.weights import LM_HEAD, TEXT, VISION, _IGNORED_PREFIXES, hub_name, load_weights, open_checkpoint

MAX_FILE_BYTES = 5 << 30  # mlx-vlm's save_weights: shards of at most 5 GB
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # torch_dtype -> safetensors
PATCH = VISION + "embeddings.patch_embedding.weight"


def is_quantized_matrix(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Whether mlx-vlm quantizes this tensor: a text linear layer's or the embedding's weight (not a
    norm), of a size that is a multiple of 64, whose rows split into groups."""
    text_matrix = name.startswith(TEXT) and name.endswith(("_proj.weight", "embed_tokens.weight")) or name == LM_HEAD
    return text_matrix and len(shape) == 2 and int(np.prod(shape)) % 64 == 0 and shape[1] % group_size == 0


def quantize_checkpoint(model_dir: str, out_dir: str, bits: int, group_size: int = 64,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Write `model_dir` quantized to `out_dir` (which must not exist, or be empty); returns counts
    {"quantized": matrices, "kept": other tensors, "bytes": bytes written}."""
    if bits not in AFFINE_BITS:
        raise InputError(f"--bits {bits}: MLX's affine quantization has {', '.join(map(str, AFFINE_BITS))} bits")
    if group_size not in AFFINE_GROUP_SIZES:
        raise InputError(f"--group-size {group_size}: MLX's affine quantization has groups of "
                         f"{', '.join(map(str, AFFINE_GROUP_SIZES))}")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise InputError(f"--out {out_dir!r} exists and is not an empty directory")
    cfg = load_config(model_dir)
    if cfg.quantization is not None:
        raise ConfigError(f"{model_dir}: already quantized ({cfg.quantization.bits}-bit groups of "
                          f"{cfg.quantization.group_size}); quantize the original checkpoint")
    load_weights(model_dir, cfg)  # every tensor checked (names, shapes, finite values) before any is written
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    torch_dtype = config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    model_dtype = DTYPE_NAMES.get(torch_dtype) if isinstance(torch_dtype, str) else None

    stored = open_checkpoint(model_dir)
    names = [n for n in stored if not hub_name(n).startswith(_IGNORED_PREFIXES)
             and not (hub_name(n) == LM_HEAD and cfg.tie_word_embeddings)]  # a tied head is the embedding
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    counts = {"quantized": 0, "kept": 0, "bytes": 0}
    for i, name in enumerate(sorted(names, key=hub_name)):
        f, hub = stored[name], hub_name(name)
        dtype = model_dtype or f.dtype(name)
        if dtype not in SAFETENSORS_FORMATS:  # F64 in the file: MLX would keep it; refpg's model reads float32
            dtype = "F32"
        values = round_to(f.float32(name), SAFETENSORS_FORMATS[dtype])  # the values in the model's dtype, as MLX sees them
        if is_quantized_matrix(hub, values.shape, group_size):
            m = quantize(values, bits, group_size, SAFETENSORS_FORMATS[dtype])
            module = hub[:-len(".weight")]
            tensors[module + ".weight"] = ("U32", m.data)
            tensors[module + ".scales"] = (dtype, m.scales.data)
            tensors[module + ".biases"] = (dtype, m.biases.data)
            counts["quantized"] += 1
        else:
            v = cfg.vision
            if hub == PATCH and values.shape[1:] == (v.num_channels, v.patch_size, v.patch_size):
                values = values.transpose(0, 2, 3, 1)  # [D, 3, P, P] -> MLX's [D, P, P, 3] (unless already so)
            tensors[hub] = (dtype, stored_as(values, dtype))
            counts["kept"] += 1
        if progress is not None:
            progress(i + 1, len(names))

    os.makedirs(out_dir, exist_ok=True)
    counts["bytes"] = write_shards(out_dir, tensors)
    config["quantization"] = config["quantization_config"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    for entry in os.listdir(model_dir):  # the tokenizer and the processor's files
        src = os.path.join(model_dir, entry)
        if os.path.isfile(src) and entry != "config.json" and not entry.startswith("model"):
            shutil.copy(src, out_dir)
    return counts


def stored_as(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values (already of `dtype`) as safetensors stores `dtype` (BF16: its bits)."""
    if dtype == "BF16":
        return f32_to_bf16(values)
    return np.ascontiguousarray(values, dtype=np.float16 if dtype == "F16" else np.float32)


def write_shards(out_dir: str, tensors: dict[str, tuple[str, np.ndarray]]) -> int:
    """model.safetensors, or model-0000k-of-0000n.safetensors + index when over 5 GB; returns bytes."""
    names, shards, size = sorted(tensors), [[]], 0
    for name in names:
        nbytes = tensors[name][1].nbytes
        if shards[-1] and size + nbytes > MAX_FILE_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = sum(tensors[n][1].nbytes for n in names)
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, {"format": "mlx"})
        return total
    weight_map = {}
    for k, part in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, file), {n: tensors[n] for n in part}, {"format": "mlx"})
        weight_map.update({n: file for n in part})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total

