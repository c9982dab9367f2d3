"""Model weights: plain dataclasses of arrays, and the loader that fills them from a checkpoint.

The loader accepts the tensor namings in the wild (the hub's `language_model.model.*`, newer
transformers' `model.language_model.*`, transformers 5's `vision_tower.*`), a single
`model.safetensors` or shards listed in `model.safetensors.index.json`, F32/BF16/F16 tensors, and
what MLX writes (mlx-community checkpoints): matrices in MLX's affine quantization (`X.weight`
packed codes, `X.scales`, `X.biases`; refpg.formats) and the patch embedding channel-last
[D, P, P, 3]. Every tensor is checked against the shape the config implies; a missing, unexpected
or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from refpg.config import PaliGemmaConfig
from refpg.formats import SAFETENSORS_FORMATS, STORAGE_DTYPE, Format, Matrix, encode
from refpg.safetensors_io import CheckpointError, SafetensorsFile


@dataclass
class Linear:
    weight: Matrix  # [out, in]
    bias: np.ndarray | None = None  # [out]


@dataclass
class Norm:
    weight: np.ndarray  # [D]
    bias: np.ndarray | None = None  # [D] (LayerNorm only)


@dataclass
class VisionLayer:
    layer_norm1: Norm
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    out_proj: Linear
    layer_norm2: Norm
    fc1: Linear
    fc2: Linear


@dataclass
class VisionWeights:
    patch_embedding: Linear  # weight [D, 3*P*P]: the P×P stride-P convolution as a matrix
    position_embedding: np.ndarray  # [N, D]
    layers: list[VisionLayer]
    post_layernorm: Norm


@dataclass
class TextLayer:
    input_layernorm: Norm
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    post_attention_layernorm: Norm
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    # Gemma 2's sandwich norms (None for Gemma):
    pre_feedforward_layernorm: Norm | None = None
    post_feedforward_layernorm: Norm | None = None


@dataclass
class TextWeights:
    embed_tokens: Matrix  # [V, H]
    layers: list[TextLayer]
    norm: Norm
    lm_head: Matrix  # [V, H]; the same Matrix as embed_tokens when tied


@dataclass
class Weights:
    vision: VisionWeights
    projector: Linear
    text: TextWeights


# ---- tensor names ----------------------------------------------------------------------------

VISION = "vision_tower.vision_model."
TEXT = "language_model.model."
PROJECTOR = "multi_modal_projector.linear."
LM_HEAD = "lm_head.weight"

# newer transformers' prefix -> the hub's prefix
_RENAMES = (
    ("model.vision_tower.vision_model.", VISION),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.linear.", PROJECTOR),
    ("model.language_model.", TEXT),
    ("language_model.lm_head.weight", LM_HEAD),
)
_IGNORED_PREFIXES = (VISION + "head.",)  # SigLIP's pooling head: PaliGemma does not use it


def hub_name(name: str) -> str:
    """A tensor's name in the hub's layout, whichever layout the file uses."""
    for new, hub in _RENAMES:
        if name.startswith(new):
            name = hub + name[len(new):]
            break
    # transformers 5's save_pretrained drops the inner `vision_model.`
    if name.startswith("vision_tower.") and not name.startswith(VISION):
        name = VISION + name[len("vision_tower."):]
    return name


def is_matrix(name: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether the tensor is a weight matrix (of a linear layer, or the embedding / LM head): the
    tensors that may come in any weight format (refpg.formats)."""
    return name == LM_HEAD or (len(shapes.get(name, ())) == 2 and not name.endswith("position_embedding.weight"))


def expected_shapes(cfg: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, by hub name, with its shape (lm_head excluded: it is optional)."""
    v, t = cfg.vision, cfg.text
    D, P, C = v.hidden_size, v.patch_size, v.num_channels
    shapes = {
        VISION + "embeddings.patch_embedding.weight": (D, C, P, P),
        VISION + "embeddings.patch_embedding.bias": (D,),
        VISION + "embeddings.position_embedding.weight": (v.num_patches, D),
        VISION + "post_layernorm.weight": (D,),
        VISION + "post_layernorm.bias": (D,),
        PROJECTOR + "weight": (cfg.projection_dim, D),
        PROJECTOR + "bias": (cfg.projection_dim,),
        TEXT + "embed_tokens.weight": (t.vocab_size, t.hidden_size),
        TEXT + "norm.weight": (t.hidden_size,),
    }
    for i in range(v.num_hidden_layers):
        p = f"{VISION}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p + norm + ".weight"] = (D,)
            shapes[p + norm + ".bias"] = (D,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (D, D)
            shapes[p + f"self_attn.{proj}.bias"] = (D,)
        shapes[p + "mlp.fc1.weight"] = (v.intermediate_size, D)
        shapes[p + "mlp.fc1.bias"] = (v.intermediate_size,)
        shapes[p + "mlp.fc2.weight"] = (D, v.intermediate_size)
        shapes[p + "mlp.fc2.bias"] = (D,)
    H, hd = t.hidden_size, t.head_dim
    norms = ["input_layernorm", "post_attention_layernorm"]
    if t.model_type == "gemma2":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(t.num_hidden_layers):
        p = f"{TEXT}layers.{i}."
        for norm in norms:
            shapes[p + norm + ".weight"] = (H,)
        shapes[p + "self_attn.q_proj.weight"] = (t.num_attention_heads * hd, H)
        shapes[p + "self_attn.k_proj.weight"] = (t.num_key_value_heads * hd, H)
        shapes[p + "self_attn.v_proj.weight"] = (t.num_key_value_heads * hd, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, t.num_attention_heads * hd)
        shapes[p + "mlp.gate_proj.weight"] = (t.intermediate_size, H)
        shapes[p + "mlp.up_proj.weight"] = (t.intermediate_size, H)
        shapes[p + "mlp.down_proj.weight"] = (H, t.intermediate_size)
    return shapes


# ---- files ----------------------------------------------------------------------------------

def open_checkpoint(model_dir: str) -> dict[str, SafetensorsFile]:
    """Map each tensor name (as stored) to the file holding it; shards via the index's weight_map."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single_path = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map' object): {e}") from None
        files: dict[str, SafetensorsFile] = {}
        where: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or os.path.basename(shard) != shard:
                raise CheckpointError(f"{index_path}: weight_map maps {name!r} to {shard!r}, "
                                      f"not the file name of a shard in {model_dir}")
            if shard not in files:
                shard_path = os.path.join(model_dir, shard)
                if not os.path.isfile(shard_path):
                    raise CheckpointError(f"{shard_path}: shard listed in {index_path} is missing")
                files[shard] = SafetensorsFile(shard_path)
            if name not in files[shard].entries:
                raise CheckpointError(f"{files[shard].path}: tensor {name!r} listed in the index is not in this shard")
            where[name] = files[shard]
        for f in files.values():
            for name in f.keys():
                if name not in where:
                    raise CheckpointError(f"{f.path}: tensor {name!r} is not listed in {index_path}")
        return where
    if os.path.isfile(single_path):
        f = SafetensorsFile(single_path)
        return {name: f for name in f.keys()}
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def load_weights(model_dir: str, cfg: PaliGemmaConfig, progress: Callable[[int, int], None] | None = None,
                 matrix_dtype: str = "float32") -> Weights:
    """Read and check every weight. Norms, biases and position embeddings become float32 arrays;
    the matrices (linear weights, embeddings) become `Matrix`es (refpg.formats) of `matrix_dtype`:
    "float32", or "bfloat16" (for the native kernels: BF16 tensors are then used as stored, without
    a copy), or "auto": bfloat16 when the checkpoint stores its embeddings as BF16. F32 tensors
    read as float32 stay memory-mapped."""
    if matrix_dtype not in ("float32", "bfloat16", "auto"):
        raise ValueError(f"matrix_dtype must be float32, bfloat16 or auto, got {matrix_dtype!r}")
    stored = open_checkpoint(model_dir)
    if matrix_dtype == "auto":  # keep a BF16 checkpoint's matrices as stored; otherwise float32
        embed = next((n for n in stored if hub_name(n) == TEXT + "embed_tokens.weight"), None)
        scales = next((n for n in stored if hub_name(n) == TEXT + "embed_tokens.scales"), None)
        kind = stored[scales or embed].dtype(scales or embed) if embed is not None else None
        matrix_dtype = "bfloat16" if kind == "BF16" else "float32"
    by_hub: dict[str, tuple[str, SafetensorsFile]] = {}
    for name, f in stored.items():
        if name.startswith(_IGNORED_PREFIXES) or hub_name(name).startswith(_IGNORED_PREFIXES):
            continue
        key = hub_name(name)
        if key in by_hub:
            raise CheckpointError(f"{f.path}: tensor {name!r} duplicates {by_hub[key][0]!r} (same weight in two namings)")
        by_hub[key] = (name, f)

    shapes = expected_shapes(cfg)
    # MLX's quantized matrices: X.weight holds the codes, X.scales and X.biases the groups' affine maps
    quantized = {n.rsplit(".", 1)[0] for n in by_hub if n.endswith((".scales", ".biases"))}
    for module in sorted(quantized):
        parts = [by_hub.get(module + suffix) for suffix in (".weight", ".scales", ".biases")]
        if not is_matrix(module + ".weight", shapes):
            name, f = next(p for p in parts if p)
            raise CheckpointError(f"{f.path}: tensor {name!r}: the model has no matrix {module!r} to quantize")
        if None in parts:
            name, f = next(p for p in parts if p)
            raise CheckpointError(f"{f.path}: {module!r} is quantized ({name!r}) but lacks "
                                  f"{module}{('.weight', '.scales', '.biases')[parts.index(None)]}")
    missing = [n for n in shapes if n not in by_hub]
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s) the config needs, "
                              f"e.g. {missing[0]!r}" + (f" (and {missing[1:4]})" if len(missing) > 1 else ""))
    extra = [by_hub[n][0] for n in by_hub if n not in shapes and n != LM_HEAD
             and not (n.endswith((".scales", ".biases")) and n.rsplit(".", 1)[0] in quantized)]
    if extra:
        raise CheckpointError(f"{by_hub[hub_name(extra[0])][1].path}: unexpected tensor {extra[0]!r} "
                              f"({len(extra)} tensor(s) the config does not describe)")

    total = len(by_hub)
    done = 0

    def get(hub: str, matrix: bool = False) -> np.ndarray | Matrix:
        nonlocal done
        name, f = by_hub[hub]
        want = shapes.get(hub) or (cfg.text.vocab_size, cfg.text.hidden_size)
        if matrix and hub.endswith(".weight") and hub[:-len(".weight")] in quantized:
            return affine(hub[:-len(".weight")], want[0], int(np.prod(want[1:])))
        # MLX's convolution layout, [D, P, P, 3] for [D, 3, P, P]
        transpose = len(want) == 4 and f.shape(name) == (want[0], *want[2:], want[1]) != want
        if f.shape(name) != want and not transpose:
            raise CheckpointError(f"{f.path}: tensor {name!r} has shape {list(f.shape(name))}, "
                                  f"the config implies {list(want)}")
        stored = f.raw(name)
        if not all_finite(stored):  # read once, as stored (bf16 bits, f16, f32): no conversion first
            raise CheckpointError(f"{f.path}: tensor {name!r} holds NaN or infinite values "
                                  f"(a corrupt or diverged checkpoint)")
        fmt = Format.BF16 if matrix and matrix_dtype == "bfloat16" else Format.F32
        values = stored if fmt is Format.BF16 and f.dtype(name) == "BF16" else f.float32(name)
        if transpose:
            values = np.ascontiguousarray(values.transpose(0, 3, 1, 2))  # -> [D, 3, P, P]
        if matrix:  # the patch embedding's [D, 3, P, P] kernel as [D, 3·P·P]: the convolution as a matrix
            values = values.reshape(want[0], -1)
            arr = Matrix(values, fmt) if values.dtype == STORAGE_DTYPE[fmt] else encode(values, fmt)
        else:
            arr = values
        narrowed = f.dtype(name) == "F64" or (fmt is Format.BF16 and f.dtype(name) == "F32")  # rounding may overflow
        if narrowed and not all_finite(arr.data if matrix else arr):
            raise CheckpointError(f"{f.path}: tensor {name!r} holds values beyond the range of {fmt.value} "
                                  f"(finite in the file); load it with weight_dtype='float32'")
        done += 1
        if progress is not None:
            progress(done, total)
        return arr

    def affine(module: str, rows: int, cols: int) -> Matrix:
        """The quantized matrix `module` (MLX's layout), checked against the config and its shape."""
        nonlocal done
        (wname, wf), (sname, sf), (bname, bf) = (by_hub[module + s] for s in (".weight", ".scales", ".biases"))
        if cfg.quantization is None:
            raise CheckpointError(f"{sf.path}: tensor {sname!r} quantizes {module!r}, but config.json has no "
                                  f"\"quantization\" saying how (bits, group_size)")
        how = cfg.quantization.of(module)
        if how is None:
            raise CheckpointError(f"{sf.path}: tensor {sname!r} quantizes {module!r}, which config.json's "
                                  f"\"quantization\" leaves unquantized")
        bits, group_size = how
        if cols % group_size:
            raise CheckpointError(f"{wf.path}: {module!r} has {cols} columns, not a multiple of the group size "
                                  f"{group_size} of config.json's \"quantization\"")
        for name, f, dtypes, shape in ((wname, wf, ("U32",), (rows, cols * bits // 32)),
                                       (sname, sf, ("F32", "BF16", "F16"), (rows, cols // group_size)),
                                       (bname, bf, ("F32", "BF16", "F16"), (rows, cols // group_size))):
            if f.dtype(name) not in dtypes or f.shape(name) != shape:
                raise CheckpointError(f"{f.path}: tensor {name!r} is {f.dtype(name)} {list(f.shape(name))}; "
                                      f"{bits}-bit codes in groups of {group_size} (config.json's \"quantization\") "
                                      f"of a [{rows}, {cols}] matrix need {' or '.join(dtypes)} {list(shape)}")
        if sf.dtype(sname) != bf.dtype(bname):
            raise CheckpointError(f"{bf.path}: tensor {bname!r} is {bf.dtype(bname)}, its scales {sf.dtype(sname)}: "
                                  f"MLX stores both in the model's dtype")
        groups = []
        for name, f in ((sname, sf), (bname, bf)):
            raw = f.raw(name)
            if not all_finite(raw):
                raise CheckpointError(f"{f.path}: tensor {name!r} holds NaN or infinite values "
                                      f"(a corrupt or diverged checkpoint)")
            groups.append(Matrix(raw, SAFETENSORS_FORMATS[f.dtype(name)]))
        done += 3
        if progress is not None:
            progress(done, total)
        return Matrix(wf.raw(wname), Format.AFFINE, bits, group_size, *groups)

    def linear(prefix: str, bias: bool = True) -> Linear:
        return Linear(get(prefix + ".weight", matrix=True), get(prefix + ".bias") if bias else None)

    def norm(prefix: str, bias: bool) -> Norm:
        return Norm(get(prefix + ".weight"), get(prefix + ".bias") if bias else None)

    v, t = cfg.vision, cfg.text
    patch = linear(VISION + "embeddings.patch_embedding")
    vision = VisionWeights(
        patch_embedding=patch,
        position_embedding=get(VISION + "embeddings.position_embedding.weight"),
        layers=[],
        post_layernorm=None,  # type: ignore[arg-type]
    )
    for i in range(v.num_hidden_layers):
        p = f"{VISION}encoder.layers.{i}."
        vision.layers.append(VisionLayer(
            layer_norm1=norm(p + "layer_norm1", True),
            q_proj=linear(p + "self_attn.q_proj"), k_proj=linear(p + "self_attn.k_proj"),
            v_proj=linear(p + "self_attn.v_proj"), out_proj=linear(p + "self_attn.out_proj"),
            layer_norm2=norm(p + "layer_norm2", True),
            fc1=linear(p + "mlp.fc1"), fc2=linear(p + "mlp.fc2"),
        ))
    vision.post_layernorm = norm(VISION + "post_layernorm", True)
    projector = linear(PROJECTOR[:-1])

    gemma2 = t.model_type == "gemma2"
    layers = []
    for i in range(t.num_hidden_layers):
        p = f"{TEXT}layers.{i}."
        layers.append(TextLayer(
            input_layernorm=norm(p + "input_layernorm", False),
            q_proj=linear(p + "self_attn.q_proj", False), k_proj=linear(p + "self_attn.k_proj", False),
            v_proj=linear(p + "self_attn.v_proj", False), o_proj=linear(p + "self_attn.o_proj", False),
            post_attention_layernorm=norm(p + "post_attention_layernorm", False),
            gate_proj=linear(p + "mlp.gate_proj", False), up_proj=linear(p + "mlp.up_proj", False),
            down_proj=linear(p + "mlp.down_proj", False),
            pre_feedforward_layernorm=norm(p + "pre_feedforward_layernorm", False) if gemma2 else None,
            post_feedforward_layernorm=norm(p + "post_feedforward_layernorm", False) if gemma2 else None,
        ))
    embed = get(TEXT + "embed_tokens.weight", matrix=True)
    # PaliGemma ties the LM head to the embeddings (as transformers does, a stored copy is then unused).
    if cfg.tie_word_embeddings:
        lm_head = embed
    elif LM_HEAD in by_hub:
        lm_head = get(LM_HEAD, matrix=True)
    else:
        raise CheckpointError(f"{model_dir}: config.json unties the LM head (tie_word_embeddings: false) "
                              f"but the checkpoint has no {LM_HEAD!r}")
    text = TextWeights(embed_tokens=embed, layers=layers, norm=norm(TEXT + "norm", False), lm_head=lm_head)
    return Weights(vision=vision, projector=projector, text=text)


def all_finite(arr: np.ndarray, chunk: int = 1 << 22) -> bool:
    """Whether arr (floats of any width, or bf16 bits as uint16) holds no NaN and no inf.

    A checkpoint of NaNs would otherwise load and answer `<pad><pad>…`. Read in chunks, with no
    temporary the size of the tensor: NaN propagates through min/max, and a bf16 value is non-finite
    exactly when its 8 exponent bits are all set.
    """
    flat = arr.reshape(-1)
    bits = np.empty(min(chunk, flat.size), np.uint16) if arr.dtype == np.uint16 else None
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        if bits is not None:
            if np.bitwise_and(part, np.uint16(0x7F80), out=bits[:part.size]).max() == 0x7F80:
                return False
        elif not (np.isfinite(part.min()) and np.isfinite(part.max())):
            return False
    return True


def embed_scale(hidden_size: int) -> np.float32:
    """Gemma multiplies token embeddings by sqrt(hidden), cast to the weight dtype (float32 here)."""
    return np.float32(math.sqrt(hidden_size))
