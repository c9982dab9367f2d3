"""mlx-vlm as an implementation under test (`refpg conform --impl mlx-vlm`).

Loading: `mlx_vlm.utils.load_model(Path(model_dir))`, what `mlx_vlm.load` does for the model (its
config handling — `ModelConfig.from_dict`, `update_module_configs` — its `sanitize` methods and its
strict `load_weights`), then the parameters are cast to float32 (`Module.set_dtype`): the suite
compares float32 arithmetic, as the transformers adapter loads with `dtype=float32`. mlx-vlm's
processor is not loaded: it is bypassed. A checkpoint mlx-vlm refuses is the case's error.

Feeding: the case's ids, pixels, mask and token types, the way `mlx_vlm.generate` /
`stream_generate` feeds them to `generate_step` (mlx_vlm/generate/dispatch.py
`_prepare_generation_inputs`, mlx_vlm/generate/ar.py `generate_step`; paligemma.py, language.py,
vision.py and config.py are mlx_vlm/models/paligemma/'s; line numbers of mlx-vlm 0.7.10):

- prefill: `emb = model.get_input_embeddings(input_ids, pixel_values, mask=attention_mask,
  token_type_ids=...)` (ar.py:431) with ids and mask as integer arrays and the pixels as float32
  NCHW, as its processor returns them (`get_input_embeddings` transposes them to NHWC itself, paligemma.py:75);
  then `model.language_model(input_ids, inputs_embeds=emb.inputs_embeds, cache=prompt_cache,
  attention_mask_4d=..., token_type_ids=...)` (ar.py:379) with `prompt_cache =
  mlx_vlm.models.cache.make_prompt_cache(model.language_model)` (ar.py:340), in one pass:
  `chunked_prefill_policy` turns chunking off for PaliGemma's bidirectional config (paligemma.py:52).
  `logits_to_keep=1`, which generate also passes, is left out so that every position's logits come
  back (PaliGemma's LanguageModel ignores it anyway).
- each decode step: `model.language_model(tokens[B, 1], inputs_embeds=None, cache=prompt_cache)`
  (ar.py:379; generate empties its kwargs after the first step, ar.py:416), positions from the
  cache's offset.

What mlx-vlm does with them (not worked around here: that is what the suite measures):
- token_type_ids: its PaliGemma has no parameter for them. `generate` forwards the processor's
  token_type_ids in **kwargs (dispatch.py:698-703), where both calls swallow them; the adapter passes them the same way,
  so they reach nothing. There is no prefix-LM rule in mlx-vlm.
- attention_mask: `get_input_embeddings` turns it into a [B, 1, T, T] outer product
  (`attention_mask_4d`, paligemma.py:132-136) that `generate` hands to the language model in
  **kwargs, which ignores it (language.py:263-271): with `use_bidirectional_attention`, which
  `ModelConfig.from_dict` sets to True when config.json leaves it out (config.py:33-34), the
  decoder builds no mask at all (language.py:234-242): every token, padding included, sees every
  token of the prefill, and each decode step sees the whole cache.
- padding: embeddings at `pad_token_id` are zeroed (paligemma.py:104-129); positions run from 0
  over padding too (one offset for all rows: a uniform shift per row, invisible under RoPE).
- a batch of B > 1: `generate` feeds one row; this adapter feeds the case's left-padded batch
  through the same calls (`batch_generate` also computes the embeddings on the padded batch,
  ar.py:3573, before its BatchGenerator re-pads the rows into a batch cache).

Activations under refpg's names, batch dimension first, recorded by swapping each watched module's
class for a subclass whose __call__ reports its output (or, for `text.embeddings`, the first
decoder layer's input: the merged embeddings after mlx-vlm's `* sqrt(hidden)`, language.py:228-229
— mlx-vlm divides the image features by sqrt(hidden) first, paligemma.py:97, so that is refpg's
`text.embeddings`); what mlx-vlm computes is unchanged. `vision.embeddings`, `vision.<i>.attn_out`,
`vision.<i>.mlp_out`, `vision.<i>`, `vision.post_layernorm`, `projector`, `text.embeddings`,
`text.<i>.attn_out`, `text.<i>.mlp_out`, `text.<i>` (+ Gemma 2's `text.<i>.post_attn_norm` and
`text.<i>.post_ff_norm`), `text.norm`, `logits`. mlx-vlm's encoder keeps only the first image's
states (vision.py:49 `h = x[0]`): `vision.post_layernorm` and `projector` come back as a batch of
one, whatever B is.

mlx and mlx-vlm are imported when the adapter is constructed, never when this module is.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from refpg.conform.adapters import Adapter, AdapterUnavailable
from refpg.conform.cases import Inputs

INSTALL = 'pip install "refpg[conform]"'
# module -> what pip calls it; mlx is a namespace package: any folder named mlx on the path finds
# "mlx", so look for its compiled core
PACKAGES = {"mlx.core": "mlx", "mlx_vlm": "mlx-vlm"}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


@contextmanager
def one_line_errors(keep: int = 4) -> Iterator[None]:
    """mlx lists missing or unexpected weights one per line; the report wants one line. The
    exception keeps its type and traceback (the suite shows where it was raised); past `keep`
    lines the rest is counted, not listed."""
    try:
        yield
    except Exception as e:
        if len(e.args) == 1 and isinstance(e.args[0], str) and "\n" in e.args[0].strip():
            lines = [line.strip() for line in e.args[0].strip().splitlines() if line.strip()]
            more = f" … ({len(lines) - keep} more)" if len(lines) > keep else ""
            e.args = (" ".join(lines[:keep]) + more,)
        raise


def watched_modules(model) -> Iterator[tuple[object, str, str]]:
    """(module, refpg name, "out" or "in") for every activation mlx-vlm's PaliGemma lets us see:
    "out" reports what the module returns, "in" its first argument."""
    if model.vision_tower is not None:
        vm = model.vision_tower.vision_model
        yield vm.embeddings, "vision.embeddings", "out"
        for i, layer in enumerate(vm.encoder.layers):
            yield layer.self_attn, f"vision.{i}.attn_out", "out"
            yield layer.mlp, f"vision.{i}.mlp_out", "out"
            yield layer, f"vision.{i}", "out"
        yield vm.post_layernorm, "vision.post_layernorm", "out"
    if model.multi_modal_projector is not None:
        yield model.multi_modal_projector, "projector", "out"
    lm = model.language_model.model
    yield lm.layers[0], "text.embeddings", "in"
    for i, layer in enumerate(lm.layers):
        gemma2 = "post_feedforward_layernorm" in layer  # an mlx Module is a dict of its children
        yield layer.self_attn, f"text.{i}.attn_out", "out"
        if gemma2:  # Gemma 1's post_attention_layernorm is the pre-MLP norm: refpg does not name it
            yield layer.post_attention_layernorm, f"text.{i}.post_attn_norm", "out"
        yield layer.mlp, f"text.{i}.mlp_out", "out"
        if gemma2:
            yield layer.post_feedforward_layernorm, f"text.{i}.post_ff_norm", "out"
        yield layer, f"text.{i}", "out"
    yield lm.norm, "text.norm", "out"


@contextmanager
def recording(model, report: Callable[[str, object], None]) -> Iterator[None]:
    """Inside the block, every watched module of `model` hands report(name, mx.array) what it
    computes. Each module's class is swapped for a subclass whose __call__ calls the original and
    reports; the classes are restored on exit."""
    swapped = []

    def watch(module, name: str, what: str) -> None:
        base = type(module)

        def __call__(self, *args, **kwargs):
            if what == "in":
                report(name, args[0] if args else kwargs["x"])
            out = base.__call__(self, *args, **kwargs)
            if what == "out":
                report(name, out)
            return out

        object.__setattr__(module, "__class__", type(base.__name__, (base,), {"__call__": __call__}))
        swapped.append((module, base))

    try:
        # the first decoder layer is watched twice (its input, its output): each swap wraps the last
        for module, name, what in watched_modules(model):
            watch(module, name, what)
        yield
    finally:
        for module, base in reversed(swapped):
            object.__setattr__(module, "__class__", base)


def as_numpy(name: str, x) -> np.ndarray:
    """An mlx array as float32 NumPy with its batch dimension (mlx-vlm's post-layernorm drops it)."""
    import mlx.core as mx

    a = np.array(x.astype(mx.float32), copy=True)
    if name == "vision.post_layernorm" and a.ndim == 2:  # vision.py:49 keeps x[0]: a batch of one
        a = a[None]
    return a


class MlxVlmAdapter(Adapter):
    """mlx-vlm's PaliGemma (float32, MLX's default device), fed as mlx_vlm.generate feeds it."""

    name = "mlx-vlm"

    def __init__(self):
        missing = [pip for module, pip in PACKAGES.items() if not installed(module)]
        if missing:
            raise AdapterUnavailable(f"mlx-vlm adapter: {' and '.join(missing)} not installed ({INSTALL})")
        try:
            import mlx.core as mx  # noqa: F401 — a wheel without its backend fails here
            import mlx_vlm.models.cache  # noqa: F401
            import mlx_vlm.utils  # noqa: F401
        except (ImportError, OSError) as e:
            raise AdapterUnavailable(f"mlx-vlm adapter: cannot import mlx / mlx-vlm ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}; {INSTALL})") from e
        self._loaded: tuple[str, object] | None = None  # (model_dir, model): the last checkpoint loaded

    def describe(self) -> str:
        import mlx.core as mx

        v = importlib.metadata.version
        device = str(mx.default_device()).removeprefix("Device(").split(",")[0]
        return f"mlx-vlm {v('mlx-vlm')} (mlx {v('mlx')}, {device}, float32)"

    def model(self, model_dir: str):
        """mlx-vlm's model of model_dir, loaded once for the cases that share it (only the last one
        is held)."""
        from pathlib import Path

        import mlx.core as mx
        from mlx_vlm.utils import load_model

        key = os.path.realpath(model_dir)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None
            with one_line_errors():
                model = load_model(Path(key))
            model.set_dtype(mx.float32)  # a no-op on F32 checkpoints; F16/BF16 computed in float32
            self._loaded = (key, model)
        return self._loaded[1]

    def run(self, case: str, model_dir: str, inputs: Inputs) -> dict[str, np.ndarray]:
        import mlx.core as mx
        from mlx_vlm.models.cache import make_prompt_cache

        model = self.model(model_dir)
        acts: dict[str, np.ndarray] = {}
        pending: list[tuple[str, object]] = []  # (dump name, mx.array), converted after each phase
        phase = ["prefill"]

        def flush():
            for name, x in pending:
                acts[name] = as_numpy(name.split("/", 1)[1], x)
            pending.clear()

        ids = mx.array(np.asarray(inputs.input_ids, np.int64))
        extra = {"token_type_ids": mx.array(np.asarray(inputs.token_type_ids, np.int64))}  # swallowed by mlx-vlm
        with one_line_errors(), recording(model, lambda name, x: pending.append((f"{phase[0]}/{name}", x))):
            emb = model.get_input_embeddings(ids, mx.array(np.asarray(inputs.pixel_values, np.float32)),
                                             mask=mx.array(np.asarray(inputs.attention_mask, np.int64)), **extra)
            kwargs = {k: v for k, v in emb.to_dict().items() if k != "inputs_embeds" and v is not None}
            cache = make_prompt_cache(model.language_model)
            out = model.language_model(ids, inputs_embeds=emb.inputs_embeds, cache=cache, **kwargs, **extra)
            pending.append(("prefill/logits", out.logits))
            flush()
            for k in range(inputs.steps):
                phase[0] = f"decode.{k}"
                tokens = mx.array(np.asarray(inputs.decode[:, k:k + 1], np.int64))
                out = model.language_model(tokens, inputs_embeds=None, cache=cache)
                pending.append((f"decode.{k}/logits", out.logits))
                flush()
        return acts
