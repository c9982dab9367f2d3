"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import numpy as np

from refpg.errors import integer, number
from refpg.ops import softmax


def check_options(temperature=0.0, top_k=None, top_p=None, seed=None, names: dict | None = None) -> None:
    """InputError naming the option (by `names[option]` if given, e.g. "--top-k") that is out of range."""
    name = (names or {}).get
    number(temperature, name("temperature", "temperature"))  # 0 = greedy
    if top_k is not None:
        integer(top_k, name("top_k", "top_k"), lo=1)
    if top_p is not None:
        number(top_p, name("top_p", "top_p"), lo=0.0, above=True, hi=1.0)
    if seed is not None:
        integer(seed, name("seed", "seed"))


def pick_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
              top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """logits [B, V] -> token ids [B] int64. temperature 0 means greedy (argmax).

    Sampling applies, in transformers' order: temperature, then top-k, then top-p (nucleus: the
    smallest set of most likely tokens whose probability reaches p; the top token always stays).
    """
    check_options(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(axis=-1).astype(np.int64)
    # the max subtracted first: a tiny temperature sends the others to -inf, never the top one to inf
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        scores = shifted / temperature  # [B, V]
    if top_k is not None and top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]  # k-th largest per row
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p is not None and top_p < 1:
        order = np.argsort(-scores, axis=-1)  # most likely first
        sorted_probs = np.take_along_axis(softmax(scores), order, axis=-1)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the tokens ranked above
        drop_sorted = before >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scores = np.where(drop, -np.inf, scores)
    probs = softmax(scores)  # float64: sums to 1 closely enough for Generator.choice
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)
