#!/usr/bin/env python3
"""Write an activation dump from transformers, in refpg's dump format, to diff refpg against it.

    python tools/transformers_dump.py --model DIR --image IMG --prompt "caption en" --decode 4 --out hf.npz
    refpg diff --model DIR --image IMG --prompt "caption en" --decode 4 --b hf.npz

Runs transformers' PaliGemma in float32 (eager attention) with hooks on its modules that report
each activation under refpg's name (see refpg/diff.py for the format), then N greedy decode steps
through its KV cache. Needs torch + transformers.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_oracle import hf_processor, hooked  # noqa: E402

from refpg.diff import DumpWriter  # noqa: E402


def transformers_dump(model_dir: str, image: str, prompt: str, out: str, decode_steps: int = 0) -> list[str]:
    import torch
    from PIL import Image
    from transformers import PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    proc = hf_processor(model_dir)
    batch = proc(images=[Image.open(image)], text=[prompt], return_tensors="pt")
    ids = batch["input_ids"]
    writer = DumpWriter(out)
    phase = ["prefill"]
    tokens: list[int] = []
    with hooked(model, lambda name, x: writer.add(f"{phase[0]}/{name}", x)), torch.no_grad():
        T = ids.shape[1]
        out_ = model(**batch, position_ids=torch.arange(1, T + 1)[None], use_cache=True)
        writer.add("prefill/logits", out_.logits.float().numpy())
        cache = out_.cache
        for k in range(decode_steps):
            token = int(out_.logits[0, -1].argmax())
            tokens.append(token)
            phase[0] = f"decode.{k}"
            out_ = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True,
                         position_ids=torch.tensor([[T + k + 1]]))
            writer.add(f"decode.{k}/logits", out_.logits.float().numpy())
            cache = out_.cache
    writer.close({"prompt": prompt, "input_ids": ids[0].tolist(), "tokens": tokens, "source": "transformers"})
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
