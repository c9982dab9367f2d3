#!/usr/bin/env python3
"""Write an activation dump from transformers, in refpg's dump format, to diff refpg against it.

    python tools/transformers_dump.py --model DIR --image IMG --prompt "caption en" --decode 4 --out hf.npz
    refpg diff --model DIR --image IMG --prompt "caption en" --decode 4 --b hf.npz

Runs transformers' PaliGemma in float32 (eager attention) with hooks on its modules that report
each activation under refpg's name (see refpg/diff.py for the format), then N greedy decode steps
through its KV cache, fed as its `generate` feeds them — the conformance suite's transformers adapter
(refpg/conform/transformers_adapter.py) on transformers' own processor output. Needs torch +
transformers; a checkpoint transformers loads only in part is an error.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_oracle import hf_processor  # noqa: E402

from refpg.conform.transformers_adapter import CachedRun, load_model  # noqa: E402
from refpg.diff import DumpWriter  # noqa: E402


def transformers_dump(model_dir: str, image: str, prompt: str, out: str, decode_steps: int = 0) -> list[str]:
    from PIL import Image

    model = load_model(model_dir)
    batch = {k: v.numpy() for k, v in hf_processor(model_dir)(images=[Image.open(image)], text=[prompt],
                                                              return_tensors="pt").items()}
    writer = DumpWriter(out)
    run = CachedRun(model, writer.add)
    logits = run.prefill(batch["input_ids"], batch["pixel_values"], batch["token_type_ids"], batch["attention_mask"])
    tokens: list[int] = []
    for _ in range(decode_steps):
        tokens.append(int(logits[0, -1].argmax()))  # greedy
        logits = run.step(np.array([[tokens[-1]]]))
    writer.close({"prompt": prompt, "input_ids": batch["input_ids"][0].tolist(), "tokens": tokens,
                  "source": "transformers"})
    return writer.names[:-1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--decode", type=int, default=0, metavar="N")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    names = transformers_dump(args.model, args.image, args.prompt, args.out, args.decode)
    print(f"wrote {len(names)} activations to {args.out}")


if __name__ == "__main__":
    main()
