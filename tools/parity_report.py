#!/usr/bin/env python3
"""Print how far refpg's NumPy reference is from transformers on each tiny checkpoint variant.

Writes every variant of tools/make_tiny_checkpoint.py into a temporary directory, runs refpg on
the inputs transformers saw, and prints max |diff| / max |reference| for the worst intermediate
activation, the prefill logits, the padded batch's logits, and the KV-cached suffix logits.

    python tools/parity_report.py [--backend cpp] [--weight-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_tiny_checkpoint import VARIANTS, make_tiny_checkpoint  # noqa: E402
from refpg.model import PaliGemma  # noqa: E402
from refpg.tap import record  # noqa: E402


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def report(model_dir: str, backend: str = "numpy", weight_dtype: str = "auto") -> dict[str, float]:
    ref = dict(np.load(os.path.join(model_dir, "reference.npz")))
    model = PaliGemma.from_pretrained(model_dir, backend=backend, weight_dtype=weight_dtype)

    def inputs(case):
        p = f"{case}/input/"
        return {k[len(p):]: v for k, v in ref.items() if k.startswith(p)}

    x = inputs("single")
    with record() as acts:
        model(x["input_ids"], x["pixel_values"], token_type_ids=x["token_type_ids"], attention_mask=x["attention_mask"])
    worst_name, worst = max(((k, rel(v, ref[f"single/{k}"])) for k, v in acts.items() if k != "logits"),
                            key=lambda kv: kv[1])
    out = {f"worst activation ({worst_name})": worst, "prefill logits": rel(acts["logits"], ref["single/logits"])}
    x = inputs("batch")
    real = x["attention_mask"].astype(bool)
    lg = model(x["input_ids"], x["pixel_values"], token_type_ids=x["token_type_ids"], attention_mask=x["attention_mask"])
    out["padded batch logits"] = rel(lg[real], ref["batch/logits"][real])
    x = inputs("suffix")
    n = int((x["token_type_ids"][0] == 0).sum())
    cache = model.new_cache(1, x["input_ids"].shape[1])
    steps = [model(x["input_ids"][:, :n], x["pixel_values"], token_type_ids=x["token_type_ids"][:, :n], cache=cache)]
    steps += [model(x["input_ids"][:, t:t + 1], cache=cache) for t in range(n, x["input_ids"].shape[1])]
    out["suffix via KV cache"] = rel(np.concatenate(steps, 1), ref["suffix/logits"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="numpy", help="refpg backend selection (default numpy, the reference)")
    ap.add_argument("--weight-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="bfloat16 rounds f32/f16 checkpoints' matrices to bf16 (needs a non-numpy matmul to be fast)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(VARIANTS):
            d = make_tiny_checkpoint(os.path.join(tmp, name), name)
            print(f"{name} ({args.backend}, weights {args.weight_dtype})")
            for what, err in report(d, args.backend, args.weight_dtype).items():
                print(f"  {what:45s} {err:.1e}")


if __name__ == "__main__":
    main()
