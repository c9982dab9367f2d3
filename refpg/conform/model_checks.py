"""The catalogue's rules, run on the user's own checkpoint (`refpg conform --model DIR`).

The checks adapt to the checkpoint: its tokenizer turns the prompt into ids, its image size sets
the pixels; a batch of two left-padded prompts, a suffix fed in the same pass as the prefix, greedy
decoding through the KV cache (the reference's own greedy tokens, fed to both), and — for a Gemma 2
decoder with a sliding window — a suffix longer than the window, so that attention must slide.
"""

from __future__ import annotations

import numpy as np

from refpg.conform.cases import Inputs

SUFFIX = "a photo of <loc0100><loc0200><loc0600><loc0700> something"
LONGER = " and describe everything in the picture in great detail"
DECODE_STEPS = 4


def _inputs(batch: dict, decode: np.ndarray) -> Inputs:
    return Inputs(batch["input_ids"], batch["pixel_values"], batch["token_type_ids"], batch["attention_mask"],
                  decode.astype(np.int64))


def model_checks(model_dir: str, image, prompt: str, reference_backend: str = "auto") -> list[tuple[str, str, Inputs]]:
    """[(check name, rule, inputs)] for this checkpoint; the decode tokens are the reference's greedy ones."""
    from refpg.model import PaliGemma
    from refpg.processor import Processor

    proc = Processor.from_pretrained(model_dir)
    model = PaliGemma.from_pretrained(model_dir, backend=reference_backend)
    flipped = proc.encode_image(image)[:, :, ::-1]  # the second row's image: the first, mirrored

    def greedy(batch: dict) -> np.ndarray:
        return model.generate(batch, max_new_tokens=DECODE_STEPS)  # [B, <= steps], <pad> after <eos>

    one = proc(images=[image], prompts=[prompt])
    two = proc(images=[image, image], prompts=[prompt, prompt + LONGER])
    two["pixel_values"][1] = flipped
    with_suffix = proc(images=[image], prompts=[prompt], suffixes=[SUFFIX])
    none = np.zeros((1, 0), np.int64)
    checks = [
        ("prefill", "core", _inputs(one, none)),
        ("kv-cache-decode", "kv-cache", _inputs(one, greedy(one))),
        ("left-padded-batch", "left-padding", _inputs(two, greedy(two))),
        ("prefix-and-suffix-in-one-pass", "prefix-lm", _inputs(with_suffix, none)),
    ]
    window = model.config.text.sliding_window
    if window is not None:  # Gemma 2: a causal part longer than the window, then decoding past it
        filler = (SUFFIX + " ") * (window // max(1, len(proc.encode_text(SUFFIX + " "))) + 2)
        long = proc(images=[image], prompts=[prompt], suffixes=[filler])
        if long["input_ids"].shape[1] + 2 <= model.config.text.max_position_embeddings:
            checks.append(("suffix-past-the-window", "sliding-window", _inputs(long, np.full((1, 2), 5))))
    return checks
