"""The `refpg` command: `refpg generate --model DIR --image PATH --prompt TEXT`."""

from __future__ import annotations

import argparse
import sys
import time

from refpg.backend import BackendError, BackendMismatch
from refpg.config import ConfigError
from refpg.model import InputError
from refpg.processor import ProcessorError
from refpg.safetensors_io import CheckpointError

# what a user can cause; anything else is a bug in refpg and keeps its traceback
USER_ERRORS = (ConfigError, CheckpointError, ProcessorError, InputError, OSError, BackendError, BackendMismatch)


def cmd_generate(args: argparse.Namespace) -> None:
    from refpg.model import PaliGemma, print_progress
    from refpg.processor import Processor

    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1) or \
            (args.top_p is not None and not 0 < args.top_p <= 1) or args.max_new_tokens < 0:
        raise InputError("need --temperature >= 0, --top-k >= 1, 0 < --top-p <= 1, --max-new-tokens >= 0")
    t0 = time.perf_counter()
    proc = Processor.from_pretrained(args.model)
    batch = proc(images=[args.image], prompts=[args.prompt])  # a bad image fails before the slow load
    model = PaliGemma.from_pretrained(args.model, backend=args.backend, check=args.check or None,
                                      progress=print_progress("loading weights"))
    n_prompt = batch["input_ids"].shape[1]
    log(f"prompt: {n_prompt} tokens ({proc.num_image_tokens} image); backend {model.selection.describe()}; "
        f"loaded in {time.perf_counter() - t0:.1f} s; encoding image + prompt…")
    t1 = time.perf_counter()
    text, n, first = proc.stream(), 0, None
    for step in model.generate_stream(batch, args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        if first is None:
            first = time.perf_counter() - t1
        if int(step[0]) == proc.eos_token_id:
            break
        n += 1
        sys.stdout.write(text.push(int(step[0])))  # whole characters only, as they complete
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    total = time.perf_counter() - t1
    rest = f", then {(total - first) / (n - 1) * 1000:.0f} ms/token" if first is not None and n > 1 else ""
    log(f"{n} tokens in {total:.2f} s (prefill + first token {first or 0:.2f} s{rest})")


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="refpg", description="Reference PaliGemma in NumPy.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer a prompt about an image, streaming the answer")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.model)")
    g.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    g.add_argument("--prompt", required=True, help='task prompt, e.g. "caption en", "detect cat", "answer en what is this?"')
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--backend", default=None,
                   help="numpy | cpp | auto | per op, e.g. matmul=cpp,attention=numpy "
                        "(default: $REFPG_BACKEND, else auto = the fastest available)")
    g.add_argument("--check", action="store_true",
                   help="run the NumPy reference beside every other op and stop at the first disagreement")
    g.set_defaults(run=cmd_generate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    except USER_ERRORS as e:
        sys.stdout.flush()
        log(f"refpg: error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
