"""PaliGemma: vision tower -> projector -> merge into the token embeddings -> Gemma decoder -> logits."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Callable, Iterator

import numpy as np

from refpg.backend import Selection, embedding, use
from refpg.config import PaliGemmaConfig, load_config
from refpg.errors import InputError, integer
from refpg.formats import Format
from refpg.gemma import KVCache, decoder, logits
from refpg.tap import tap
from refpg.vision import project, vision_tower
from refpg.weights import Weights, embed_scale, load_weights



def merge_image_features(embeds: np.ndarray, ids: np.ndarray, image_features: np.ndarray | None,
                         image_token: int) -> np.ndarray:
    """Put the projected image features at the <image> positions. [B, T, H] -> [B, T, H].

    The features are not scaled by sqrt(hidden) — only token embeddings are.
    """
    is_image = ids == image_token  # [B, T]
    if image_features is None:
        if is_image.any():
            raise InputError("input_ids hold <image> tokens but no pixel_values were given")
        return embeds
    B, N, _ = image_features.shape
    counts = is_image.sum(axis=1)
    if not (counts == N).all():
        raise InputError(f"each row of input_ids needs exactly {N} <image> tokens (id {image_token}) for its image; "
                         f"found {counts.tolist()}")
    embeds = embeds.copy()
    embeds[is_image] = image_features.reshape(B * N, -1)  # row-major: row b's N features in order
    return embeds


class PaliGemma:
    """The whole model. `PaliGemma.from_pretrained(dir)` loads a published checkpoint directory."""

    def __init__(self, config: PaliGemmaConfig, weights: Weights, selection: Selection | None = None):
        self.config = config
        self.weights = weights
        self.selection = selection or Selection.from_spec("numpy")

    @classmethod
    def from_pretrained(cls, path: str, backend: str | dict | None = None, check: bool | None = None,
                        weight_dtype: str = "auto",
                        progress: Callable[[int, int], None] | None = None) -> "PaliGemma":
        """Load a checkpoint directory.

        backend: "numpy" | "cpp" | "cuda" | "auto" | {op: backend} | "op=backend,…"; None reads
        REFPG_BACKEND, else auto (cpp when the extension is built; cuda only when asked for). With
        matmul on cuda the weights are uploaded to the GPU here, once. check: run NumPy beside
        every other op and raise on disagreement (None reads REFPG_CHECK). weight_dtype: "float32",
        "bfloat16", or "auto" — bfloat16 when the checkpoint stores BF16 and matmul is not NumPy
        (the native kernels read bf16 directly: half the memory traffic), else float32. A quantized
        checkpoint (MLX's affine format, config.json's "quantization") keeps its matrices as stored;
        auto runs linear and embedding on a backend that reads them (cpp or numpy).
        """
        selection = Selection.from_spec(backend, check)  # a bad selection fails before any file is read
        config = load_config(path)
        if config.quantization:  # the matrices' ops go to a backend that reads quantized weights
            selection = Selection.from_spec(backend, check, frozenset({Format.AFFINE}))
        if weight_dtype == "auto":
            # bf16 as stored only when matmul reads it so (NumPy would decode it on every call)
            weight_dtype = "auto" if selection.reads_bf16 else "float32"
        weights = load_weights(path, config, progress=progress, matrix_dtype=weight_dtype)
        return cls(config, selection.prepare_weights(weights), selection)

    # ---- forward ----------------------------------------------------------------------------

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[B, 3, S, S] -> [B, N, H]: SigLIP features projected into the text width."""
        return np.asarray(self._image_features(pixel_values))

    def _image_features(self, pixel_values: np.ndarray):
        """encode_images, left where the selected kernels keep data (the GPU for cuda)."""
        v = self.config.vision
        want = (v.num_channels, v.image_size, v.image_size)
        pixel_values = np.asarray(pixel_values)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != want or pixel_values.shape[0] == 0:
            raise InputError(f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}] with B >= 1, "
                             f"got {list(pixel_values.shape)}")
        if not np.issubdtype(pixel_values.dtype, np.floating):  # uint8 would be raw, unnormalized pixels
            raise InputError(f"pixel_values must be a float array (normalized, as the Processor makes them), "
                             f"got {pixel_values.dtype}")
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if not np.isfinite(pixels).all():
            raise InputError("pixel_values holds NaN or infinite values")
        with use(self.selection):
            return project(vision_tower(pixels, self.weights.vision, v), self.weights.projector)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """A KV cache for `batch_size` rows of up to `max_len` tokens (default: the model's limit,
        max_position_embeddings). On the CPU its pages are claimed only as tokens are written; on
        cuda the whole cache is allocated on the GPU at the first layer's append: size it."""
        limit = self.config.text.max_position_embeddings
        max_len = limit if max_len is None else max_len
        batch_size = integer(batch_size, "batch_size", lo=1)
        max_len = integer(max_len, "max_len", lo=1)
        if max_len > limit:
            raise InputError(f"max_len {max_len} exceeds the model's max_position_embeddings {limit}")
        return KVCache(self.config.text, batch_size, max_len)

    def __call__(self, input_ids, pixel_values=None, token_type_ids=None, attention_mask=None,
                 cache: KVCache | None = None, last_only: bool = False) -> np.ndarray:
        """Logits [B, T, V] (or [B, 1, V] with last_only), with the meaning of transformers' logits.

        token_type_ids: 0 = prefix (image + prompt: full attention inside it), 1 = suffix (causal).
        Omitted, every token is causal, as in transformers; the Processor always supplies them.
        With a cache that already holds tokens, new tokens are suffix tokens and attend to all of it.
        Positions count real tokens from 1 (padding does not advance them), as in transformers'
        PaliGemma without padding and its generate() with padding.
        """
        ids, valid, prefix = self._check_inputs(input_ids, token_type_ids, attention_mask, cache)
        B, T = ids.shape
        if cache is None:
            cache = KVCache(self.config.text, B, T)
        elif cache.batch_size != B:
            raise InputError(f"cache was made for batch size {cache.batch_size}, input_ids has {B} rows")
        if cache.length + T > self.config.text.max_position_embeddings:
            raise InputError(f"sequence of {cache.length + T} tokens exceeds the model's limit of "
                             f"{self.config.text.max_position_embeddings}")
        features = self._image_features(pixel_values) if pixel_values is not None else None
        if features is not None and features.shape[0] != B:
            raise InputError(f"pixel_values holds {features.shape[0]} images for {B} rows of input_ids")
        t = self.config.text
        with use(self.selection):
            # <image> ids may lie past the embedding table: look up id 0 there, the features replace it
            lookup = np.where(ids == self.config.image_token_index, 0, ids)
            embeds = embedding(self.weights.text.embed_tokens, lookup) * embed_scale(t.hidden_size)
            x = tap("text.embeddings", merge_image_features(embeds, ids, features, self.config.image_token_index))
            h = decoder(x, valid, prefix, self.weights.text, t, cache)
            if last_only:
                h = h[:, -1:]
            return np.asarray(logits(h, self.weights.text, t))  # on the host (from the GPU for cuda)

    def _check_inputs(self, input_ids, token_type_ids, attention_mask, cache):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be a non-empty [B, T] integer array, got {ids.dtype} {list(ids.shape)}")
        ids = ids.astype(np.int64)
        V, image_token = self.config.text.vocab_size, self.config.image_token_index
        bad = ((ids < 0) | (ids >= V)) & (ids != image_token)
        if bad.any():
            raise InputError(f"input_ids holds id {int(ids[bad][0])} outside the vocabulary [0, {V})")

        def as_flags(a, name):
            a = np.asarray(a)
            if a.shape != ids.shape:
                raise InputError(f"{name} must have the shape of input_ids {list(ids.shape)}, got {list(a.shape)}")
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool) or not np.isin(a, (0, 1)).all():
                raise InputError(f"{name} must hold only 0 and 1 (integers or bools), got {a.dtype} values "
                                 f"{np.unique(a)[:4].tolist()}")
            return a

        valid = np.ones(ids.shape, bool) if attention_mask is None else as_flags(attention_mask, "attention_mask") != 0
        if (cache is None or cache.length == 0) and not valid.any(axis=1).all():
            raise InputError(f"attention_mask row {int(np.flatnonzero(~valid.any(axis=1))[0])} has no real token")
        if token_type_ids is None:
            prefix = np.zeros(ids.shape, bool)  # transformers without token types: plain causal attention
        else:
            prefix = as_flags(token_type_ids, "token_type_ids") == 0
            if cache is not None and cache.length > 0 and (prefix & valid).any():
                raise InputError("prefix tokens (token_type 0) must all come in the first call; "
                                 "tokens after cached ones are suffix tokens (token_type 1)")
        return ids, valid, prefix & valid

    # ---- generation -------------------------------------------------------------------------

    def generate(self, batch: dict, max_new_tokens: int = 20, **sampling) -> np.ndarray:
        """New token ids [B, n] int64 (n <= max_new_tokens); rows that hit <eos> are padded with <pad>.

        Greedy by default; sampling options: temperature, top_k, top_p, seed.
        """
        steps = list(self.generate_stream(batch, max_new_tokens, **sampling))
        return np.stack(steps, axis=1) if steps else np.zeros((len(batch["input_ids"]), 0), np.int64)

    def generate_stream(self, batch: dict, max_new_tokens: int = 20, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None,
                        seed: int | None = None) -> Iterator[np.ndarray]:
        """An iterator over the next token of every row ([B] int64) as it is decoded. The arguments
        are checked here, at the call, before anything runs."""
        from refpg.sampling import check_options

        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise InputError(f"batch must be a dict with input_ids (and pixel_values, token_type_ids, "
                             f"attention_mask), as the Processor returns; got {type(batch).__name__}"
                             + (f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else ""))
        integer(max_new_tokens, "max_new_tokens")
        check_options(temperature, top_k, top_p, seed)
        T = self._check_inputs(batch["input_ids"], None, None, None)[0].shape[1]
        limit = self.config.text.max_position_embeddings
        if T + max_new_tokens > limit:
            raise InputError(f"prompt of {T} tokens + max_new_tokens {max_new_tokens} exceeds the model's limit of "
                             f"{limit} positions")
        return self._decode(batch, max_new_tokens, np.random.default_rng(seed), dict(
            temperature=temperature, top_k=top_k, top_p=top_p))

    def _decode(self, batch: dict, max_new_tokens: int, rng: np.random.Generator, sampling: dict):
        """Prefill, then one token per step through the KV cache until every row has said <eos>."""
        from refpg.sampling import pick_next

        B, T = np.shape(batch["input_ids"])
        cache = self.new_cache(B, T + max_new_tokens)
        step_logits = self(batch["input_ids"], batch.get("pixel_values"), token_type_ids=batch.get("token_type_ids"),
                           attention_mask=batch.get("attention_mask"), cache=cache, last_only=True)[:, -1]
        done = np.zeros(B, bool)
        eos, pad = self.config.eos_token_id, self.config.pad_token_id
        for _ in range(max_new_tokens):
            token = np.where(done, pad, pick_next(step_logits, rng, **sampling))
            yield token
            done |= token == eos
            if done.all():
                return
            step_logits = self(token[:, None], token_type_ids=np.ones((B, 1), np.int64), cache=cache)[:, -1]

def print_progress(label: str) -> Callable[[int, int], None]:
    """A progress callback: redraws `label: done/total` on a terminal (at most 5 times a second),
    and prints the final count once."""
    start = time.perf_counter()
    last = [0.0]
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total:
            sys.stderr.write(f"\r{label}: {done}/{total} ({now - start:.1f} s)\n")
        elif tty and now - last[0] > 0.2:
            last[0] = now
            sys.stderr.write(f"\r{label}: {done}/{total} ({now - start:.1f} s)")
        else:
            return
        sys.stderr.flush()

    return show
