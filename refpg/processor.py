"""The PaliGemma processor: images and prompts in, the model's input arrays out; token ids back to text.

Owns everything between the user's inputs and the model: reading `tokenizer.model` and the optional
`preprocessor_config.json`, decoding image files, converting any Pillow mode to RGB, the bicubic
resize, rescale and normalize; the prompt layout (`<image>` × N, `<bos>`, prompt, "\\n", suffix,
`<eos>`), token types, left padding; and decoding ids to text, whole or one token at a time.

It reproduces transformers 5's `PaliGemmaProcessor` with `SiglipImageProcessorPil` and the
`GemmaTokenizer` that transformers converts from the same `tokenizer.model`, bit for bit:
- an image given as a path is opened as transformers' `load_image` does: EXIF rotation applied,
  then `convert("RGB")` (an alpha channel is dropped); an image given as a `PIL.Image` is not
  rotated and its transparency is composited onto white (`convert_to_rgb`);
- control pieces of the vocabulary (`<bos>`, `<eos>`, `<pad>`, `<mask>`, …) and `<unk>` written
  literally in a prompt become those tokens, as they do in transformers; everything between them is
  encoded by sentencepiece (`<locXXXX>`, `<segXXX>` and "\\n" are user-defined pieces it keeps whole).
A `max_length` limit is the model's business, not checked here.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps
import sentencepiece as spm

from refpg.config import PaliGemmaConfig, load_config
from refpg.errors import ProcessorError

IMAGE_TOKEN = "<image>"




@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes pixel values (transformers' `SiglipImageProcessor` defaults)."""

    size: int = 224
    resample: PIL.Image.Resampling = PIL.Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- images


def open_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Decode an image file as transformers' `load_image` does: EXIF rotation applied, then RGB."""
    try:
        with PIL.Image.open(path) as image:
            image = PIL.ImageOps.exif_transpose(image)
            return image.convert("RGB")  # also forces the full decode: a truncated file fails here
    except FileNotFoundError:
        raise ProcessorError(f"{os.fspath(path)}: image file not found") from None
    except Exception as e:  # Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error, …
        raise ProcessorError(f"{os.fspath(path)}: not a readable image ({type(e).__name__}: {e})") from None


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any Pillow mode to RGB; transparency (an alpha band or a transparent palette entry) over white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def as_rgb_image(image, index: int = 0) -> PIL.Image.Image:
    """A PIL image, a path or a uint8 [H, W, 3] array, as an RGB PIL image (at least 1×1 pixel)."""
    if isinstance(image, PIL.Image.Image):
        try:
            rgb = to_rgb(image)
        except Exception as e:  # a closed image, a mode Pillow cannot convert, pixels it cannot load
            raise ProcessorError(f"image {index}: Pillow cannot read this image ({type(e).__name__}: {e})") from None
    elif isinstance(image, (str, os.PathLike)):
        rgb = open_image(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ProcessorError(f"image {index}: an array image must be uint8 [H, W, 3], "
                                 f"got {image.dtype} {list(image.shape)}")
        rgb = PIL.Image.fromarray(image) if image.size else None  # uint8 [H, W, 3] is RGB
    else:
        raise ProcessorError(f"image {index}: expected a PIL.Image, a file path or a uint8 [H, W, 3] array, "
                             f"got {type(image).__name__}")
    if rgb is None or min(rgb.size) == 0:
        size = list(image.shape) if rgb is None else f"{rgb.size[0]}x{rgb.size[1]}"
        raise ProcessorError(f"image {index}: has no pixels (size {size})")
    return rgb


def pixel_values(image: PIL.Image.Image, spec: ImageSpec) -> np.ndarray:
    """RGB image -> [3, S, S] float32: bicubic resize (aspect ratio not kept), rescale, normalize."""
    resized = image.resize((spec.size, spec.size), resample=spec.resample)
    x = np.asarray(resized)                                          # [S, S, 3] uint8
    x = (x.astype(np.float64) * spec.rescale_factor).astype(np.float32)  # transformers rescales in float64
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (x - mean) / std                                             # float32 throughout
    return np.ascontiguousarray(x.transpose(2, 0, 1))                # [3, S, S]


def read_image_spec(model_dir: str, image_size: int, num_image_tokens: int) -> ImageSpec:
    """The image settings: `preprocessor_config.json`'s values where present, else SigLIP's defaults."""
    path = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        return ImageSpec(size=image_size)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError("expected a JSON object")
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(flag) is False:
                raise ValueError(f"{flag}: false is not supported (PaliGemma resizes, rescales and normalizes)")
        size = d.get("size") or {"height": image_size, "width": image_size}
        if (size.get("height"), size.get("width")) != (image_size, image_size):
            raise ValueError(f"size {size} does not match the vision tower's image_size {image_size}")
        seq_len = d.get("image_seq_length", num_image_tokens)
        if seq_len != num_image_tokens:
            raise ValueError(f"image_seq_length {seq_len} does not match the model's {num_image_tokens} image tokens")
        default = ImageSpec()
        return ImageSpec(
            size=image_size,
            resample=PIL.Image.Resampling(d.get("resample", default.resample)),
            rescale_factor=_finite(d.get("rescale_factor", default.rescale_factor), "rescale_factor", nonzero=True),
            mean=_three_floats(d.get("image_mean", default.mean), "image_mean"),
            std=_three_floats(d.get("image_std", default.std), "image_std", nonzero=True),
        )
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
        raise ProcessorError(f"{path}: {e}") from None


def _finite(value, name: str, nonzero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (nonzero and value == 0):
        raise ValueError(f"{name} must be a finite{' nonzero' if nonzero else ''} number, got {value!r}")
    return float(value)


def _three_floats(value, name: str, nonzero: bool = False) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values, got {value!r}")
    return tuple(_finite(v, name, nonzero) for v in values)


# ---------------------------------------------------------------- text


def load_sentencepiece(model_dir: str) -> spm.SentencePieceProcessor:
    path = os.path.join(model_dir, "tokenizer.model")
    if not os.path.isfile(path):
        raise ProcessorError(f"{path}: missing (a PaliGemma checkpoint directory has a sentencepiece tokenizer.model)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(path)
    except (OSError, RuntimeError) as e:
        raise ProcessorError(f"{path}: not a sentencepiece model ({e})") from None
    return sp


def special_pieces(sp: spm.SentencePieceProcessor) -> dict[str, int]:
    """Control pieces and `<unk>`: transformers matches these literally in text (`<bos>` -> 2, …)."""
    return {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}


class TextStream:
    """Turns generated ids into text one token at a time; a character split over byte pieces appears once whole."""

    def __init__(self, processor: "Processor"):
        self._processor = processor
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token ("" while a multi-byte character is still incomplete)."""
        return self._utf8.decode(self._processor.token_bytes(token_id))

    def flush(self) -> str:
        """U+FFFD if the text ended inside a multi-byte character, else ""."""
        return self._utf8.decode(b"", final=True)


class Processor:
    """Images + prompts -> `input_ids`, `pixel_values`, `token_type_ids`, `attention_mask`."""

    def __init__(self, sp: spm.SentencePieceProcessor, config: PaliGemmaConfig, image_spec: ImageSpec | None = None,
                 source: str = "tokenizer.model"):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.image_size = config.vision.image_size
        self.num_image_tokens = config.num_image_tokens
        self.image_token_index = config.image_token_index
        self.max_positions = config.text.max_position_embeddings  # prompt + answer must fit in it
        self.pad_token_id, self.eos_token_id, self.bos_token_id = (
            config.pad_token_id, config.eos_token_id, config.bos_token_id)
        self.image_spec = image_spec or ImageSpec(size=self.image_size)
        self._check_ids(source)
        self.specials = special_pieces(sp)                      # piece -> id, e.g. "<eos>" -> 1
        self._special_ids = set(self.specials.values()) | {self.image_token_index}
        names = sorted(self.specials, key=len, reverse=True)    # longest first: leftmost-longest matching
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Processor":
        """Read `config.json`, `tokenizer.model` and, if present, `preprocessor_config.json`."""
        model_dir = os.fspath(model_dir)
        config = load_config(model_dir)
        sp = load_sentencepiece(model_dir)
        spec = read_image_spec(model_dir, config.vision.image_size, config.num_image_tokens)
        return cls(sp, config, spec, source=os.path.join(model_dir, "tokenizer.model"))

    def _check_ids(self, source: str) -> None:
        for name, expected in (("<pad>", self.pad_token_id), ("<eos>", self.eos_token_id), ("<bos>", self.bos_token_id)):
            if not (0 <= expected < self.vocab_size and self.sp.id_to_piece(expected) == name):
                raise ProcessorError(f"{source}: config.json says {name} is id {expected}, the tokenizer disagrees")
        if self.image_token_index < self.vocab_size and self.sp.id_to_piece(self.image_token_index) != IMAGE_TOKEN:
            raise ProcessorError(f"{source}: config.json's image_token_index {self.image_token_index} is the piece "
                                 f"{self.sp.id_to_piece(self.image_token_index)!r} here, not {IMAGE_TOKEN}")

    # -- images

    def encode_image(self, image) -> np.ndarray:
        """A PIL image, a path or a uint8 [H, W, 3] array -> [3, S, S] float32."""
        return pixel_values(as_rgb_image(image), self.image_spec)

    # -- text

    def encode_text(self, text: str) -> list[int]:
        """Sentencepiece ids of `text`, with control pieces written in it (`<eos>`, …) as those tokens."""
        if self._special_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, chunk in enumerate(self._special_re.split(text)):  # odd chunks are the matched specials
            ids.extend([self.specials[chunk]] if i % 2 else self.sp.encode(chunk))
        return ids

    def tokenize_prompt(self, prompt: str, suffix: str | None = None) -> tuple[list[int], list[int]]:
        """`<image>`×N `<bos>` prompt "\\n" [suffix `<eos>`] -> (ids, token types: 1 on the suffix)."""
        prompt = _without_image_token(prompt, "prompt")
        prefix = [self.image_token_index] * self.num_image_tokens + [self.bos_token_id] + self.encode_text(prompt + "\n")
        if suffix is None:
            return prefix, [0] * len(prefix)
        # The suffix is encoded on its own (transformers' text pair): no piece spans the "\n" boundary.
        answer = self.encode_text(_without_image_token(suffix, "suffix", allow_leading=False)) + [self.eos_token_id]
        return prefix + answer, [0] * len(prefix) + [1] * len(answer)

    def __call__(self, images, prompts, suffixes=None) -> dict[str, np.ndarray]:
        """One image per prompt -> input_ids / token_type_ids / attention_mask [B, T] int64 (left-padded
        with <pad>), pixel_values [B, 3, S, S] float32."""
        images, prompts, suffixes = _as_batch(images, prompts, suffixes)
        pixels = np.stack([pixel_values(as_rgb_image(image, i), self.image_spec) for i, image in enumerate(images)])
        rows = [self.tokenize_prompt(prompt, suffix) for prompt, suffix in zip(prompts, suffixes)]
        input_ids, token_type_ids, attention_mask = self._left_pad(rows)
        return {"input_ids": input_ids, "pixel_values": pixels,   # [B, T] int64, [B, 3, S, S] float32
                "token_type_ids": token_type_ids, "attention_mask": attention_mask}

    def _left_pad(self, rows: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Right-align every row (transformers pads Gemma on the left): pads are <pad>, type 0, mask 0."""
        length = max(len(ids) for ids, _ in rows)
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)  # [B, T]
        token_type_ids = np.zeros((len(rows), length), dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for b, (ids, types) in enumerate(rows):
            start = length - len(ids)
            input_ids[b, start:] = ids
            token_type_ids[b, start:] = types
            attention_mask[b, start:] = 1
        return input_ids, token_type_ids, attention_mask

    # -- ids back to text

    def is_special(self, token_id: int) -> bool:
        """Control pieces, `<unk>`, `<image>` and ids with no piece (the embedding's padding rows)."""
        return token_id in self._special_ids or not 0 <= token_id < self.vocab_size

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids -> text. Skipping specials also stops at the first <eos>; <locXXXX>/<segXXX> stay as text.
        Decodes as transformers' Gemma decoder does: "▁" -> " ", a run of byte pieces -> its UTF-8 text
        (or one U+FFFD per byte if the run is not valid UTF-8), pieces concatenated."""
        pieces: list[str | bytes] = []
        for token_id in map(int, ids):
            if skip_special_tokens and token_id == self.eos_token_id:
                break
            if self.is_special(token_id):
                if not skip_special_tokens:  # (skipped ones vanish: byte pieces around them join one run)
                    pieces.append(self._special_text(token_id))
                continue
            pieces.append(self.token_bytes(token_id) if self.sp.is_byte(token_id) else self._piece_text(token_id))
        return join_pieces(pieces)

    def _special_text(self, token_id: int) -> str:
        if token_id == self.image_token_index:
            return IMAGE_TOKEN
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else ""

    def _piece_text(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id).replace("\u2581", " ")

    def token_bytes(self, token_id: int) -> bytes:
        """UTF-8 bytes of one token: "▁" as a space, a byte piece `<0xNN>` as that byte, b"" for specials."""
        token_id = int(token_id)
        if self.is_special(token_id):
            return b""
        if self.sp.is_byte(token_id):
            return bytes([int(self.sp.id_to_piece(token_id)[3:5], 16)])  # "<0xE2>" -> b"\xe2"
        return self._piece_text(token_id).encode("utf-8")

    def decode_token(self, token_id: int) -> str:
        """Text of one token ("" for specials). A lone byte of a multi-byte character gives U+FFFD;
        to stream such characters whole, use `stream()`."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def stream(self) -> TextStream:
        """An incremental decoder: `push(id)` returns the text each new token completes."""
        return TextStream(self)


def join_pieces(pieces: list[str | bytes]) -> str:
    """Concatenate token texts; each maximal run of single bytes (byte-fallback pieces) is decoded as
    UTF-8 as a whole, and becomes one U+FFFD per byte if invalid (the `tokenizers` ByteFallback rule)."""
    out: list[str] = []
    run = bytearray()
    for piece in pieces + [""]:  # the empty sentinel flushes a trailing run
        if isinstance(piece, bytes):
            run += piece
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
            run = bytearray()
        out.append(piece)
    return "".join(out)


def _as_batch(images, prompts, suffixes) -> tuple[list, list[str], list[str | None]]:
    """Lists of equal length (a lone image / str is a batch of one); suffixes default to None each."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    suffixes = [None] * len(prompts) if suffixes is None else [suffixes] if isinstance(suffixes, str) else list(suffixes)
    if not prompts:
        raise ProcessorError("no prompts given")
    if len(images) != len(prompts):
        raise ProcessorError(f"got {len(images)} images for {len(prompts)} prompts (PaliGemma takes one image per prompt)")
    if len(suffixes) != len(prompts):
        raise ProcessorError(f"got {len(suffixes)} suffixes for {len(prompts)} prompts (one each)")
    for i, (prompt, suffix) in enumerate(zip(prompts, suffixes)):
        if not isinstance(prompt, str) or not isinstance(suffix, (str, type(None))):
            raise ProcessorError(f"prompt {i}: prompts and suffixes must be str, got "
                                 f"{type(prompt).__name__} and {type(suffix).__name__}")
        for what, text in (("prompt", prompt), ("suffix", suffix or "")):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 (e.g. from argv)
                raise ProcessorError(f"{what} {i} is not valid text: {text[max(0, e.start - 10):e.end + 10]!r} "
                                     f"holds bytes that are not UTF-8") from None
    return images, prompts, suffixes


def _without_image_token(text: str, what: str, allow_leading: bool = True) -> str:
    """Accept transformers' style "<image>caption en" (one leading <image>); the processor places the
    image tokens itself, so any other <image> in the text is an error."""
    if allow_leading and text.startswith(IMAGE_TOKEN):
        text = text[len(IMAGE_TOKEN):]
    if IMAGE_TOKEN in text:
        raise ProcessorError(f"{what} {text!r} contains {IMAGE_TOKEN}: the processor places the image tokens itself")
    return text
