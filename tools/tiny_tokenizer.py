"""Train a tiny sentencepiece BPE model shaped like Gemma's tokenizer, for tests.

Same special ids and normalizer settings as the real PaliGemma `tokenizer.model` (pad 0, eos 1,
bos 2, unk 3, mask 4; byte fallback; no dummy prefix; identity normalization; whitespace kept;
digits split; "\\n" a piece of its own; `<loc0000>`…`<loc1023>` and `<seg000>`…`<seg127>` ordinary
pieces), trained on a few hundred generated English sentences so that the vocabulary stays small
(1800 pieces). The same call always writes the same model.

    python tools/tiny_tokenizer.py --out /tmp/tiny    # writes /tmp/tiny/tokenizer.model
"""

from __future__ import annotations

import argparse
import io
import os

import sentencepiece as spm

VOCAB_SIZE = 1800  # 5 special + 1153 user-defined + 256 bytes + ~90 characters + ~300 merges
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]

_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "brown", "grey"]
_THINGS = ["cat", "dog", "car", "tree", "house", "bird", "person", "bicycle", "boat", "cup",
           "table", "chair", "horse", "train", "flower", "clock", "phone", "book", "apple", "bus"]
_PLACES = ["on the street", "in the park", "near the river", "on a table", "in the kitchen",
           "at the beach", "under a bridge", "in front of a building", "on the grass", "in the snow"]
_VERBS = ["sitting", "standing", "running", "sleeping", "parked", "waiting", "lying", "jumping"]
_QUESTIONS = ["what is in the image?", "what colour is the {t}?", "how many {t}s are there?",
              "where is the {t}?", "is there a {t}?", "what is the {t} doing?"]
_LANGS = ["en", "fr", "de", "es"]
_EXTRA = [
    "Café crème, naïve façade — déjà vu.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, 10, 42, 3.14 and 2024-05-17.",
    "Punctuation (brackets) [square] {curly} \"quotes\" 'single' ; : ! ? / \\ | @ # $ % ^ & * + = ~ _",
    "Tabs\tand  double  spaces   and    more.",
    "UPPER CASE WORDS AND Mixed Case Words",
]


def training_sentences() -> list[str]:
    """A few hundred captions, prompts and answers; a pure function (no randomness)."""
    out: list[str] = list(_EXTRA)
    for i, thing in enumerate(_THINGS):
        for j, colour in enumerate(_COLOURS):
            place = _PLACES[(i + j) % len(_PLACES)]
            verb = _VERBS[(i * 3 + j) % len(_VERBS)]
            out.append(f"A {colour} {thing} {verb} {place}.")
            if j % 3 == 0:
                out.append(f"caption {_LANGS[(i + j) % len(_LANGS)]}")
                out.append(f"detect {thing} ; {_THINGS[(i + 7) % len(_THINGS)]}")
                q = _QUESTIONS[(i + j) % len(_QUESTIONS)].format(t=thing)
                out.append(f"answer en {q}")
                out.append(f"There are {i + j} {thing}s and {j + 1} {colour} ones.")
    return out


def train_tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> bytes:
    """The serialized sentencepiece model (the bytes of a `tokenizer.model`)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        pad_id=0, pad_piece="<pad>",
        eos_id=1, eos_piece="<eos>",
        bos_id=2, bos_piece="<bos>",
        unk_id=3, unk_piece="<unk>",
        control_symbols=["<mask>"],  # Gemma's id 4; keeps transformers from appending one
        user_defined_symbols=["\n"] + LOC_TOKENS + SEG_TOKENS,
        byte_fallback=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        treat_whitespace_as_suffix=False,
        num_threads=1,  # one thread, no sampling: the same input gives the same model
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def write_tiny_tokenizer(out_dir: str) -> str:
    """Train the tiny model and write `<out_dir>/tokenizer.model`; returns that path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(train_tiny_tokenizer())
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny Gemma-shaped sentencepiece tokenizer.model for tests.")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write tokenizer.model into")
    args = parser.parse_args(argv)
    print(write_tiny_tokenizer(args.out))


if __name__ == "__main__":
    main()
