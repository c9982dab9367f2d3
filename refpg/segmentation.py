"""PaliGemma's segmentation answers: `<loc>×4 <seg>×16 label ; …` -> boolean masks in image pixels.

`segment X` is answered with, per object, four location tokens (the box, as in detection), sixteen
<seg> codes and the label. The codes index the codebook of a small VQ-VAE (UViM, arXiv:2301.02229),
which big_vision ships as `vae-oid.npz`; its decoder turns the 4 × 4 grid of code vectors into a
64 × 64 map of mask logits. As big_vision's evaluator
(big_vision/evaluators/proj/paligemma/transfers/segmentation.py) does it:

    codes [N, 16] -> codebook rows [N, 4, 4, D]
    -> conv 1×1 (D -> C), ReLU -> 2 residual blocks (conv 3×3, ReLU, conv 3×3, ReLU, conv 1×1, + input)
    -> 4 × (transposed conv 4×4, stride 2, ReLU): 4 -> 8 -> 16 -> 32 -> 64 pixels, C -> C, C/2, C/4, C/8
    -> conv 1×1 (C/8 -> 1) = mask logits [N, 64, 64] (C = 128 in vae-oid.npz)

and the box is v / 1023 of the image side (its tokens are round(b · 1023) of the normalized box),
truncated to whole pixels; the 64 × 64 logits are resized into the box with Pillow's bilinear filter
and thresholded at 0. (Detection answers use v / 1024, refpg.detection; the two differ by < 1 pixel
per 1000.)

The file layout is the PyTorch state dict big_vision converts from: `_vq_vae._embedding` [codes, D];
convolutions `decoder.{i}.weight` [out, in, kh, kw] and `.bias` [out]; transposed convolutions
[in, out, kh, kw]; residual blocks `decoder.{2,3}.net.{0,2,4}.*`. The encoder's tensors (`encoder.*`)
may be present and are not needed here. Channel counts are read from the file, so smaller VQ-VAEs
in the same layout (the demo model's) decode too.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np

from refpg.detection import Box
from refpg.errors import CheckpointError, InputError

NUM_TOKENS = 16  # <seg> codes per object: a 4 × 4 grid
GRID = 4
LOC_MAX = 1023  # big_vision bins a normalized box as round(b · 1023)
VAE_ENV = "REFPG_VAE"

# The encoder (big_vision/pp/proj/paligemma/segmentation.py: what turns a training mask into codes):
# four stride-2 convs with ReLU, two residual blocks, a last conv to the code vectors; kernel sizes
# as the file has them, TensorFlow's 'SAME' padding.
_ENCODER_LAYERS = [("down", "encoder.0"), ("down", "encoder.2"), ("down", "encoder.4"), ("down", "encoder.6"),
                   ("res", "encoder.8.net"), ("res", "encoder.9.net"), ("out", "encoder.10")]

# The decoder's layers in the order they run: (kind, state-dict prefix).
# Kernel sizes are big_vision's Decoder's (1×1 in and out, 3×3 / 3×3 / 1×1 residual convs, 4×4 up).
_LAYERS = [("in", "decoder.0"),
           ("res", "decoder.2.net"), ("res", "decoder.3.net"),
           ("up", "decoder.4"), ("up", "decoder.6"), ("up", "decoder.8"), ("up", "decoder.10"),
           ("out", "decoder.12")]


# ---- the layers (x is [N, H, W, C], weights as stored) ----------------------------------------------

def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int = 1) -> np.ndarray:
    """Convolution with TensorFlow's 'SAME' padding: weight [C_out, C_in, k, k] -> [N, ⌈H/s⌉, ⌈W/s⌉, C_out].
    The padding totals (out - 1)·s + k - in, the smaller half before (for stride 1 and odd k: k // 2
    on each side, as flax's padding=1 for 3×3)."""
    k = weight.shape[-1]
    n, h, w, _ = x.shape
    out_h, out_w = -(-h // stride), -(-w // stride)
    pad_h, pad_w = max((out_h - 1) * stride + k - h, 0), max((out_w - 1) * stride + k - w, 0)
    xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    y = np.broadcast_to(bias, (n, out_h, out_w, weight.shape[0])).astype(np.float32)
    for a in range(k):
        for b in range(k):
            window = xp[:, a:a + (out_h - 1) * stride + 1:stride, b:b + (out_w - 1) * stride + 1:stride, :]
            y = y + window @ weight[:, :, a, b].T  # [N, out_h, out_w, C_out]
    return y


def conv_transpose2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int = 2,
                     padding: int = 1) -> np.ndarray:
    """Transposed convolution (PyTorch's ConvTranspose2d; flax's with transpose_kernel=True and
    padding k - 1 - padding): input pixel (i, j) adds x[i, j] @ weight[:, :, a, b] at output pixel
    (stride·i + a - padding, stride·j + b - padding). weight [C_in, C_out, k, k] -> [N, 2H, 2W, C_out]
    for k = 4, stride 2, padding 1."""
    k = weight.shape[-1]
    n, h, w, _ = x.shape
    full = np.zeros((n, (h - 1) * stride + k, (w - 1) * stride + k, weight.shape[1]), np.float32)
    for a in range(k):
        for b in range(k):
            full[:, a:a + (h - 1) * stride + 1:stride, b:b + (w - 1) * stride + 1:stride, :] += x @ weight[:, :, a, b]
    out_h, out_w = (h - 1) * stride + k - 2 * padding, (w - 1) * stride + k - 2 * padding
    return full[:, padding:padding + out_h, padding:padding + out_w, :] + bias


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def res_block(x: np.ndarray, convs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """conv 3×3, ReLU, conv 3×3, ReLU, conv 1×1, plus the block's input."""
    (w0, b0), (w1, b1), (w2, b2) = convs
    h = relu(conv2d(x, w0, b0))
    h = relu(conv2d(h, w1, b1))
    return conv2d(h, w2, b2) + x


# ---- the VQ-VAE decoder -------------------------------------------------------------------------------

class VQVAE:
    """The mask decoder of a `vae-oid.npz`-layout file: `VQVAE.load(path).decode(codes)`."""

    def __init__(self, codebook: np.ndarray, layers: list, encoder: list | None = None):
        self.codebook = codebook  # [codes, D]
        self.layers = layers      # [(kind, [(weight, bias), …])] in _LAYERS order
        self.encoder = encoder    # the same for _ENCODER_LAYERS, where the file has them

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @classmethod
    def load(cls, path: str | os.PathLike) -> VQVAE:
        """Reads and checks a VQ-VAE in the vae-oid.npz layout (CheckpointError naming what is wrong)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"VQ-VAE file {path!r} does not exist (the mask decoder, e.g. vae-oid.npz)")
        try:
            with np.load(path, allow_pickle=False) as f:
                tensors = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: not a readable .npz of the VQ-VAE ({e})") from None
        return cls.from_state_dict(tensors, path)

    @classmethod
    def from_state_dict(cls, tensors: dict, name: str = "VQ-VAE") -> VQVAE:
        def get(key: str, ndim: int) -> np.ndarray:
            if key not in tensors:
                raise CheckpointError(f"{name}: missing tensor {key!r} (expected the vae-oid.npz layout)")
            t = np.asarray(tensors[key])
            if t.ndim != ndim or t.dtype.kind != "f" or t.size == 0:
                raise CheckpointError(f"{name}: {key} must be a non-empty {ndim}-d float array, "
                                      f"got {t.dtype} {list(t.shape)}")
            if not np.isfinite(t).all():
                raise CheckpointError(f"{name}: {key} holds NaN or infinite values")
            return t.astype(np.float32)

        def layer(prefix: str, c_in: int, transposed: bool, k: int) -> tuple[np.ndarray, np.ndarray]:
            w, b = get(prefix + ".weight", 4), get(prefix + ".bias", 1)
            w_in, w_out = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
            if w_in != c_in or w.shape[2:] != (k, k) or b.shape != (w_out,):
                layout = f"[in, out, {k}, {k}]" if transposed else f"[out, in, {k}, {k}]"
                raise CheckpointError(f"{name}: {prefix}.weight {list(w.shape)} / .bias {list(b.shape)} do not "
                                      f"fit: expected {layout} with {c_in} input channels and a bias per output")
            return w, b

        codebook = get("_vq_vae._embedding", 2)  # [codes, D]
        channels, layers = codebook.shape[1], []
        for kind, prefix in _LAYERS:
            if kind == "res":
                convs = [layer(prefix + ".0", channels, False, 3), layer(prefix + ".2", channels, False, 3),
                         layer(prefix + ".4", channels, False, 1)]
                if convs[-1][0].shape[0] != channels or convs[0][0].shape[0] != convs[1][0].shape[1]:
                    raise CheckpointError(f"{name}: the residual block {prefix} must keep {channels} channels")
            else:
                convs = [layer(prefix, channels, kind == "up", 4 if kind == "up" else 1)]
            layers.append((kind, convs))
            channels = convs[-1][0].shape[1] if kind == "up" else convs[-1][0].shape[0]
        if channels != 1:
            raise CheckpointError(f"{name}: decoder.12 must give one channel (the mask), gives {channels}")
        encoder = None
        if any(k.startswith("encoder.") for k in tensors):
            channels, encoder = 1, []
            for kind, prefix in _ENCODER_LAYERS:
                convs, c_in = [], channels
                for conv_name in ([prefix + c for c in (".0", ".2", ".4")] if kind == "res" else [prefix]):
                    convs.append(layer(conv_name, c_in, False, get(conv_name + ".weight", 4).shape[2]))
                    c_in = convs[-1][0].shape[0]
                if kind == "res" and c_in != channels:
                    raise CheckpointError(f"{name}: the residual block {prefix} must keep {channels} channels")
                encoder.append((kind, convs))
                channels = c_in
            if channels != codebook.shape[1]:
                raise CheckpointError(f"{name}: encoder.10 gives {channels} channels, the codebook's vectors "
                                      f"have {codebook.shape[1]}")
        return cls(codebook, layers, encoder)

    def decode(self, codes) -> np.ndarray:
        """int codes [N, 16] -> mask logits float32 [N, 64, 64] (big_vision's reconstruct_masks, before
        resizing and thresholding)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != NUM_TOKENS or codes.dtype.kind not in "iu":
            raise InputError(f"codes must be integers [N, {NUM_TOKENS}], got {codes.dtype} {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise InputError(f"codes must lie in [0, {self.num_codes - 1}] (the codebook's rows), "
                             f"got {int(codes.min())}…{int(codes.max())}")
        x = self.codebook[codes].reshape(len(codes), GRID, GRID, self.codebook.shape[1])  # [N, 4, 4, D]
        for kind, convs in self.layers:
            if kind == "res":
                x = res_block(x, convs)
            elif kind == "up":
                x = relu(conv_transpose2d(x, *convs[0]))  # [N, 2H, 2W, C']
            elif kind == "in":
                x = relu(conv2d(x, *convs[0]))  # [N, 4, 4, C]: code vectors to channels
            else:
                x = conv2d(x, *convs[0])  # [N, 64, 64, 1]: mask logits
        return x[..., 0].astype(np.float32)  # [N, 64, 64]


def encode_masks(vae: VQVAE, masks) -> np.ndarray:
    """masks float [N, 64, 64] in [0, 1] (the object's box, resized) -> codes int64 [N, 16]: the
    encoder, then each of the 4 × 4 vectors' nearest codebook row (big_vision's
    encode_to_codebook_indices)."""
    x = encoder_outputs(vae, masks)                             # [N, 4, 4, D]
    flat = x.reshape(-1, vae.codebook.shape[1])  # [N·16, D]
    distances = (flat ** 2).sum(1, keepdims=True) + (vae.codebook ** 2).sum(1) - 2 * flat @ vae.codebook.T
    return distances.argmin(1).reshape(len(x), NUM_TOKENS).astype(np.int64)


def encoder_outputs(vae: VQVAE, masks) -> np.ndarray:
    """masks float [N, 64, 64] in [0, 1] -> the encoder's code vectors float32 [N, 4, 4, D], before
    they are replaced by their nearest codebook rows."""
    if vae.encoder is None:
        raise InputError("this VQ-VAE file has no encoder (encoder.* tensors): it can decode masks, not encode them")
    masks = np.asarray(masks, np.float32)
    if masks.ndim != 3 or masks.shape[1:] != (64, 64):
        raise InputError(f"masks must be [N, 64, 64], got {list(masks.shape)}")
    x = (2.0 * (masks - 0.5))[..., None]  # [N, 64, 64, 1] in [-1, 1]
    for kind, convs in vae.encoder:
        if kind == "down":
            x = relu(conv2d(x, *convs[0], stride=2))  # [N, H/2, W/2, C]
        elif kind == "res":
            x = res_block(x, convs)
        else:
            x = conv2d(x, *convs[0])  # [N, 4, 4, D]
    return x.astype(np.float32)


def load_vae(path: str | os.PathLike | None = None, beside: str | os.PathLike | None = None) -> VQVAE | None:
    """The VQ-VAE at `path`, else at $REFPG_VAE, else `vae.npz` in the checkpoint directory `beside`
    (where the demo model keeps its own), else None."""
    if path is not None:
        return VQVAE.load(path)
    env = os.environ.get(VAE_ENV, "").strip()
    if not env:
        own = os.path.join(beside, "vae.npz") if beside is not None else None
        return VQVAE.load(own) if own and os.path.isfile(own) else None
    try:
        return VQVAE.load(env)
    except CheckpointError as e:
        raise CheckpointError(f"environment variable {VAE_ENV}: {e}") from None


# ---- answers -> masks ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """One object of a segmentation answer. `mask` is bool [height, width] in image pixels, `box` the
    pixel box it fills; both None, and `problem` says why, when the sequence is not a valid one."""
    label: str
    box: Box | None
    codes: tuple[int, ...] | None
    mask: np.ndarray | None = None
    problem: str | None = None


_TOKEN = re.compile(r"<(loc|seg)(\d+)>")


def _read_object(part: str, width: int, height: int, num_codes: int):
    """(label, box, codes, problem) of one `;`-separated part of an answer."""
    tokens = _TOKEN.findall(part)
    label = _TOKEN.sub("", part).strip()
    kinds = [kind for kind, _ in tokens]
    if kinds != ["loc"] * 4 + ["seg"] * NUM_TOKENS:
        got = f"{kinds.count('loc')} <loc> and {kinds.count('seg')} <seg> tokens"
        return label, None, None, f"expected 4 <loc> then {NUM_TOKENS} <seg> tokens, got {got}" + \
            ("" if kinds.count("loc") != 4 or kinds.count("seg") != NUM_TOKENS else " out of order")
    loc = [int(v) for _, v in tokens[:4]]
    codes = tuple(int(v) for _, v in tokens[4:])
    if max(loc) > LOC_MAX:
        return label, None, codes, f"location token <loc{max(loc)}> is past <loc{LOC_MAX}>"
    if max(codes) >= num_codes:
        return label, None, codes, f"<seg{max(codes)}> is past the VQ-VAE's {num_codes} codes"
    y0, x0, y1, x1 = loc
    if y1 <= y0 or x1 <= x0:
        return label, None, codes, f"empty box: y {y0}..{y1}, x {x0}..{x1} (need y2 > y1 and x2 > x1)"
    # big_vision: the box in [0, 1] is the tokens / 1023; pixels truncate toward 0
    py0, px0 = int(y0 / LOC_MAX * height), int(x0 / LOC_MAX * width)
    py1, px1 = int(y1 / LOC_MAX * height), int(x1 / LOC_MAX * width)
    if py1 <= py0 or px1 <= px0:
        return label, None, codes, f"the box is under one pixel in a {width}×{height} image"
    return label, Box(label, py0, px0, py1, px1), codes, None


def format_segments(objects: list[tuple[Box, tuple[int, ...]]], width: int, height: int) -> str:
    """The answer PaliGemma gives for objects [(box in whole pixels, 16 codes)], labelled by box.label:
    each box edge p of an image side S becomes <loc ⌈p · 1023 / S⌉>, which parse_segments' (big_vision's)
    ⌊v / 1023 · S⌋ reads back as p exactly."""
    def loc(p: float, side: int) -> str:
        return f"<loc{min(LOC_MAX, -(-int(p) * LOC_MAX // side)):04d}>"

    return " ; ".join(loc(b.y0, height) + loc(b.x0, width) + loc(b.y1, height) + loc(b.x1, width)
                      + "".join(f"<seg{c:03d}>" for c in codes) + " " + b.label for b, codes in objects)


def mask_in_image(logits: np.ndarray, box: Box, width: int, height: int) -> np.ndarray:
    """64 × 64 mask logits -> bool [height, width]: resized bilinearly into the box (Pillow, as
    big_vision), > 0 inside it, False elsewhere."""
    from PIL import Image

    y0, x0, y1, x1 = int(box.y0), int(box.x0), int(box.y1), int(box.x1)
    inside = np.asarray(Image.fromarray(np.asarray(logits, np.float32)).resize((x1 - x0, y1 - y0), Image.BILINEAR))
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = inside > 0.0
    return mask


def parse_segments(text: str, width: int, height: int, vae: VQVAE) -> list[Segment]:
    """Every object of a segmentation answer (parts separated by ` ; ` that hold <loc>/<seg> tokens),
    with its mask in the pixels of a width × height image; invalid ones carry `problem` instead."""
    objects = [_read_object(part, width, height, vae.num_codes) for part in text.split(";") if _TOKEN.search(part)]
    valid = [i for i, (_, _, _, problem) in enumerate(objects) if problem is None]
    logits = vae.decode(np.array([objects[i][2] for i in valid], np.int64).reshape(-1, NUM_TOKENS))
    masks = dict(zip(valid, logits))
    segments = []
    for i, (label, box, codes, problem) in enumerate(objects):
        mask = mask_in_image(masks[i], box, width, height) if problem is None else None
        segments.append(Segment(label, box, codes, mask, problem))
    return segments
