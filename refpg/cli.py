"""The `refpg` command: `refpg generate [--model DIR] --image PATH --prompt TEXT`, `refpg demo`, …

Without `--model`, commands use the tiny demo model shipped in the package (refpg/data/demo: a real,
trained PaliGemma of the synthetic shapes world in refpg.scenes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import refpg

from refpg.errors import USER_ERRORS, InputError, integer, number  # what a user can cause; anything else keeps its traceback
# exit codes: 0 done, 1 `diff` found a divergence (as cmp and diff do), 2 bad input
EXIT_DIVERGED, EXIT_BAD_INPUT = 1, 2




def cmd_generate(args: argparse.Namespace) -> None:
    from refpg.model import PaliGemma, print_progress
    from refpg.processor import Processor
    from refpg.sampling import check_options

    check_options(args.temperature, args.top_k, args.top_p, args.seed, names=SAMPLING_FLAGS)
    integer(args.max_new_tokens, "--max-new-tokens")
    check_prompt(args.prompt)
    if args.draw:
        check_output(args.draw, "--draw", image=True)
    from refpg.segmentation import load_vae

    vae = load_vae(args.vae, beside=args.model)  # a bad file fails before the slow load, too
    t0 = time.perf_counter()
    proc = Processor.from_pretrained(args.model)
    batch = proc(images=[args.image], prompts=[args.prompt])  # a bad image fails before the slow load
    limit = proc.max_positions
    if batch["input_ids"].shape[1] + args.max_new_tokens > limit:
        raise InputError(f"prompt of {batch['input_ids'].shape[1]} tokens + --max-new-tokens {args.max_new_tokens} "
                         f"exceeds the model's limit of {limit} positions")
    model = PaliGemma.from_pretrained(args.model, backend=args.backend, check=args.check or None,
                                      progress=print_progress("loading weights"))
    n_prompt = batch["input_ids"].shape[1]
    log(f"prompt: {n_prompt} tokens ({proc.num_image_tokens} image); backend {model.selection.describe()}; "
        f"loaded in {time.perf_counter() - t0:.1f} s; encoding image + prompt…")
    t1 = time.perf_counter()
    text, n, first, answer = proc.stream(), 0, None, []
    for step in model.generate_stream(batch, args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        if first is None:
            first = time.perf_counter() - t1
        if int(step[0]) == proc.eos_token_id:
            break
        n += 1
        answer.append(int(step[0]))
        sys.stdout.write(text.push(int(step[0])))  # whole characters only, as they complete
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    answer_text = proc.decode(answer)
    if args.draw or "<seg" in answer_text:
        draw_answer(answer_text, args.image, args.draw, vae)
    total = time.perf_counter() - t1
    rest = f", then {(total - first) / (n - 1) * 1000:.0f} ms/token" if first is not None and n > 1 else ""
    log(f"{n} tokens in {total:.2f} s (prefill + first token {first or 0:.2f} s{rest})")


def draw_answer(answer: str, image_path: str, out: str | None, vae) -> None:
    """Decode the answer's masks (<seg> codes, with the VQ-VAE) or boxes; draw them on the image into `out`."""
    from refpg.detection import draw_detections, parse_detections
    from refpg.processor import open_image
    from refpg.segmentation import VAE_ENV, parse_segments

    image = open_image(image_path)
    if "<seg" in answer and vae is None:
        log(f"the answer holds <seg> codes: give --vae vae-oid.npz (or set {VAE_ENV}) to decode its masks")
    if "<seg" in answer and vae is not None:
        segments = parse_segments(answer, *image.size, vae)
        for i, seg in enumerate(segments):
            if seg.problem:
                log(f"object {i + 1} ({seg.label or 'no label'}): no mask, {seg.problem}")
        valid = [seg for seg in segments if seg.problem is None]
        log(f"decoded {len(valid)} mask(s)" + (f" of {len(segments)} objects" if len(valid) < len(segments) else ""))
        if out:
            draw_detections(image, [seg.box for seg in valid], out, masks=[seg.mask for seg in valid])
            log(f"drew {len(valid)} mask(s) with their boxes on {out}")
        return
    if out:
        boxes = parse_detections(answer, *image.size)
        draw_detections(image, boxes, out)
        log(f"drew {len(boxes)} box(es) on {out}")


# Held-out scenes (training used seeds from 1000 up, tools/eval_demo.py 0-299) with 2, 3 and 1 shapes,
# picked among 500-539 as ones the shipped model answers entirely right: a showcase, not a measurement.
DEMO_SEEDS = (506, 501, 502)
DEMO_ZOOM = 4                  # the 64-pixel scenes are drawn 4x larger in the picture
DEMO_WORLD = "grid"            # refpg.scenes.WORLDS: where the shipped model's shapes sit


def cmd_demo(args: argparse.Namespace) -> None:
    """Ask the shipped model every question about a few scenes; draw its detections (its masks, where
    it has a VQ-VAE beside it to decode `segment` answers)."""
    import numpy as np
    import PIL.Image

    from refpg import scenes
    from refpg.detection import Box, draw_detections, parse_detections
    from refpg.model import PaliGemma
    from refpg.processor import Processor
    from refpg.segmentation import load_vae, parse_segments

    check_output(args.out, "--out", image=True)
    path = refpg.DEMO_MODEL
    t0 = time.perf_counter()
    proc = Processor.from_pretrained(path)
    model = PaliGemma.from_pretrained(path)  # no backend: the fastest available
    vae = load_vae(os.path.join(path, "vae.npz")) if os.path.isfile(os.path.join(path, "vae.npz")) else None
    print(f"refpg demo: the tiny PaliGemma shipped in {path} "
          f"({model.config.vision.image_size}x{model.config.vision.image_size} images), "
          f"backend {model.selection.describe()}, loaded in {time.perf_counter() - t0:.2f} s")
    z = DEMO_ZOOM
    tile = scenes.SIZE * z
    picture = PIL.Image.new("RGB", (tile * len(DEMO_SEEDS) + 8 * (len(DEMO_SEEDS) - 1), tile), "white")
    drawn: list[Box] = []
    masks: list[np.ndarray] = []
    shown = "segment" if vae is not None else "detect"  # the picture shows each object's own answer to this
    for i, seed in enumerate(DEMO_SEEDS):
        scene = scenes.scene_for_seed(seed, scenes.WORLDS[DEMO_WORLD])
        left = i * (tile + 8)
        picture.paste(scene.image.resize((tile, tile), PIL.Image.Resampling.NEAREST), (left, 0))
        print(f"\nscene {i + 1} (seed {seed}, {len(scene.objects)} shape{'s' if len(scene.objects) > 1 else ''}; "
              f"panel {i + 1} of {args.out})")
        for prompt, _ in scenes.tasks(scene, vae):
            t1 = time.perf_counter()
            ids = model.generate(proc(images=[scene.image], prompts=[prompt]), max_new_tokens=26)
            answer = proc.decode(ids[0])
            print(f"  {prompt} \u2192 {answer}   ({(time.perf_counter() - t1) * 1000:.0f} ms)")
            if scenes.task_kind(prompt) != shown:
                continue
            if shown == "detect":
                boxes = parse_detections(answer, scenes.SIZE, scenes.SIZE)
            else:
                valid = [seg for seg in parse_segments(answer, scenes.SIZE, scenes.SIZE, vae) if seg.problem is None]
                boxes = [seg.box for seg in valid]
                for seg in valid:  # the 64-pixel mask, zoomed into its panel of the picture
                    mask = np.zeros((picture.height, picture.width), bool)
                    mask[:, left:left + tile] = np.kron(seg.mask, np.ones((z, z), bool))
                    masks.append(mask)
            drawn += [Box(b.label, b.y0 * z, b.x0 * z + left, b.y1 * z, b.x1 * z + left) for b in boxes]
    draw_detections(picture, drawn, args.out, masks=masks or None)
    what = f"{len(masks)} segmented masks" if vae is not None else f"{len(drawn)} detected boxes"
    print(f"\nwrote {os.path.abspath(args.out)}: the {len(DEMO_SEEDS)} scenes with the {what} drawn")


SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed"}

def image_extensions() -> list[str]:
    """The file name endings Pillow can write an image to."""
    import PIL.Image

    PIL.Image.init()
    return sorted(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.SAVE)


def check_prompt(prompt: str) -> None:
    """A blank prompt is a mistake on the command line (the model would quietly caption the image)."""
    if not prompt.strip():
        raise InputError('--prompt is empty; give a task such as "caption en", "detect cat" or "answer en what is this?"')


def check_output(path: str, flag: str, image: bool = False) -> None:
    """Fail before the slow work if `path` cannot be written: its folder must exist (and an image
    needs an extension Pillow writes)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a folder, give a file name")
    if image and os.path.splitext(path)[1].lower() not in image_extensions():
        raise InputError(f"{flag} {path}: not an image file name; end it in .png, .jpg or another extension "
                         f"Pillow writes")


def check_run_args(args: argparse.Namespace) -> None:
    """dump's and diff's common flags."""
    integer(args.decode, "--decode")
    check_prompt(args.prompt)


def cmd_dump(args: argparse.Namespace) -> None:
    from refpg import diff
    from refpg.model import PaliGemma
    from refpg.processor import Processor

    check_run_args(args)
    check_output(args.out, "--out")
    proc = Processor.from_pretrained(args.model)
    proc(images=[args.image], prompts=[args.prompt])  # a bad image fails before the slow load
    model = PaliGemma.from_pretrained(args.model, backend=args.backend)
    names = diff.dump(model, proc, args.image, args.prompt, args.out, args.decode)
    log(f"wrote {len(names)} activations ({model.selection.describe()}) to {args.out}")


def cmd_diff(args: argparse.Namespace) -> int:
    import json

    from refpg import diff
    from refpg.model import PaliGemma
    from refpg.processor import Processor

    check_run_args(args)
    number(args.tol, "--tol", above=True)
    if args.json:
        check_output(args.json, "--json")
    if args.plot:
        check_output(args.plot, "--plot", image=True)
    proc = Processor.from_pretrained(args.model)
    proc(images=[args.image], prompts=[args.prompt])  # a bad image fails before the slow loads
    model_a = PaliGemma.from_pretrained(args.model, backend=args.a)
    b_is_dump = args.b.endswith(".npz")
    if b_is_dump:
        if args.model_b:
            raise InputError("--model-b and a dump as --b exclude each other")
        dump_b = diff.Dump(args.b)  # a missing or malformed dump fails before the run
        result = diff.diff_runs(model_a, None, proc, args.image, args.prompt, args.decode, args.tol, dump_b=dump_b)
        b_desc = args.b
    else:
        model_b = PaliGemma.from_pretrained(args.model_b or args.model, backend=args.b)
        result = diff.diff_runs(model_a, model_b, proc, args.image, args.prompt, args.decode, args.tol)
        b_desc = f"{args.model_b or args.model} with {model_b.selection.describe()}"
    print(f"A: {args.model} with {model_a.selection.describe()}\nB: {b_desc}\n")
    print(diff.format_table(result, color=sys.stdout.isatty()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=1)
        log(f"wrote {args.json}: one record per activation")
    if args.plot:
        diff.plot(result, args.plot)
        log(f"wrote {args.plot}: max rel error of every activation, per tower")
    return EXIT_DIVERGED if result.first_divergent else 0


def cmd_quantize(args: argparse.Namespace) -> None:
    from refpg.model import print_progress
    from refpg.quantize import quantize_checkpoint

    t0 = time.perf_counter()
    counts = quantize_checkpoint(args.model, args.out, args.bits, args.group_size, progress=print_progress("quantizing"))
    log(f"wrote {args.out}: {counts['quantized']} matrices as {args.bits}-bit codes in groups of {args.group_size} "
        f"(MLX affine), {counts['kept']} tensors as they were; {counts['bytes'] / 2**20:.1f} MiB "
        f"in {time.perf_counter() - t0:.1f} s")


def cmd_conform(args: argparse.Namespace) -> int:
    """Run the conformance catalogue (or the checks on --model) against an implementation."""
    import json
    import shutil
    import tempfile

    from refpg.conform import cases as catalogue
    from refpg.conform.adapters import AdapterUnavailable, RefpgAdapter, make_adapter
    from refpg.conform.run import check, format_table, run_case

    try:
        selected = catalogue.select(args.cases)
    except ValueError as e:
        raise InputError(f"--cases: {e}") from None
    if args.list:
        for case in selected:
            print(f"{case.name:31s} {case.rule:16s} {case.checkpoint:24s} {case.note}")
        return 0
    if args.write_cases:
        written = catalogue.export_cases(selected, args.write_cases)
        log(f"wrote {len(written)} cases to {args.write_cases}: checkpoints/ and <case>.inputs.npz "
            f"(write <case>.npz dumps into a directory D, then run refpg conform --impl dump:D)")
        return 0
    if not args.impl:
        raise InputError("--impl is required (or --list, or --write-cases DIR)")
    tol = number(args.tol, "--tol", above=True)
    try:
        adapter = make_adapter(args.impl)
    except (AdapterUnavailable, ValueError, ImportError) as e:
        raise InputError(f"--impl: {e}") from None
    print(f"conformance of {adapter.describe()} with refpg {refpg.__version__}'s reference: every activation "
          f"within max rel {tol:g}; both are fed the same ids and pixels (processors bypassed)\n", flush=True)
    progress = (lambda r: log(f"  {r.case}: {r.status}")) if sys.stderr.isatty() else None
    if args.model:
        from refpg.conform.model_checks import model_checks

        check_prompt(args.prompt)
        from refpg import scenes

        image = args.image or scenes.scene_for_seed(506).image
        checks = model_checks(args.model, image, args.prompt, args.reference)
        results = []
        for name, rule, inputs in checks:
            results.append(check(adapter, name, rule, args.model, inputs, tol, RefpgAdapter(args.reference)))
            if progress:
                progress(results[-1])
    else:
        root = args.keep or tempfile.mkdtemp(prefix="refpg-conform-")
        try:
            results = []
            for case in selected:
                results.append(run_case(adapter, case, root, tol))
                if progress:
                    progress(results[-1])
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    print(format_table(results, tol))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"implementation": adapter.describe(), "tol": tol, "results": [r.to_json() for r in results]},
                      f, indent=1)
        log(f"wrote {args.json}")
    return EXIT_DIVERGED if any(r.status != "pass" for r in results) else 0


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line on stderr (exit code 2), like refpg's own."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"refpg: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="refpg", description="Reference PaliGemma in NumPy.",
                epilog="exit codes: 0 done, 1 diff found a divergence, 2 bad input (one line on stderr)")
    ap.add_argument("--version", action="version", version=f"refpg {refpg.__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("generate", help="answer a prompt about an image, streaming the answer")
    g.add_argument("--model", default=refpg.DEMO_MODEL,
                   help="checkpoint directory (config.json, *.safetensors, tokenizer.model); "
                        "default: the tiny demo model shipped with refpg (64x64 shapes scenes, see `refpg demo`)")
    g.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    g.add_argument("--prompt", required=True, help='task prompt, e.g. "caption en", "detect cat", "answer en what is this?"')
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--draw", default=None, metavar="OUT.png",
                   help="save the image with the detected boxes (<loc…> groups in the answer) drawn on it, "
                        "and the masks of a segmentation answer (with --vae)")
    g.add_argument("--vae", default=None, metavar="FILE.npz",
                   help="the VQ-VAE that decodes <seg> codes into masks (big_vision's vae-oid.npz layout; "
                        "default: $REFPG_VAE, else a vae.npz in the --model directory)")
    g.add_argument("--backend", default=None,
                   help="numpy | cpp | auto | per op, e.g. matmul=cpp,attention=numpy "
                        "(default: $REFPG_BACKEND, else auto = the fastest available)")
    g.add_argument("--check", action="store_true",
                   help="run the NumPy reference beside every other op and stop at the first disagreement")
    g.set_defaults(run=cmd_generate)

    m = sub.add_parser("demo", help="run the tiny trained PaliGemma shipped with refpg on a few synthetic scenes")
    m.add_argument("--out", default="refpg-demo.png", metavar="FILE.png",
                   help="where to save the scenes with the detected boxes drawn (default ./refpg-demo.png)")
    m.set_defaults(run=cmd_demo)

    def run_args(p):
        p.add_argument("--model", default=refpg.DEMO_MODEL, help="checkpoint directory (default: the shipped demo model)")
        p.add_argument("--image", required=True, help="image file")
        p.add_argument("--prompt", required=True, help="task prompt")
        p.add_argument("--decode", type=int, default=0, metavar="N", help="also capture N greedy decode steps")

    d = sub.add_parser("dump", help="write every named activation of a run to an .npz")
    run_args(d)
    d.add_argument("--out", required=True, help="output .npz")
    d.add_argument("--backend", default="numpy", help="backend selection (default numpy)")
    d.set_defaults(run=cmd_dump)

    x = sub.add_parser("diff", help="compare two runs activation by activation; show where they part ways")
    run_args(x)
    x.add_argument("--a", default="numpy", metavar="SPEC", help="run A's backend selection (default numpy)")
    x.add_argument("--b", default="numpy", metavar="SPEC|DUMP.npz",
                   help="run B: a backend selection (numpy, cpp, matmul=cpp,…) or an activation dump")
    x.add_argument("--model-b", default=None, metavar="DIR", help="run B's checkpoint (default: --model)")
    x.add_argument("--tol", type=float, default=1e-3, help="max rel error (max|b-a|/max|a|) allowed (default 1e-3)")
    x.add_argument("--json", default=None, metavar="FILE", help="write one record per activation, in order")
    x.add_argument("--plot", default=None, metavar="FILE.png", help="plot error per layer, log scale")
    x.set_defaults(run=cmd_diff)

    q = sub.add_parser("quantize", help="write a checkpoint in MLX's affine 2-8-bit quantization (as mlx-vlm convert)",
                       description="Quantizes the text model's matrices and embedding exactly as MLX's quantize and "
                                   "mlx-vlm's convert do (same bytes); the vision tower and projector stay as they are. "
                                   "The result loads in refpg and in mlx-vlm.")
    q.add_argument("--model", required=True, metavar="DIR", help="the checkpoint to quantize (F32, BF16 or F16)")
    q.add_argument("--bits", type=int, required=True, help="bits per weight: 4 or 8 (also 2, 3, 5, 6)")
    q.add_argument("--group-size", type=int, default=64, help="weights sharing a scale and bias: 32, 64 (default) or 128")
    q.add_argument("--out", required=True, metavar="DIR", help="the new checkpoint directory (must not exist, or be empty)")
    q.set_defaults(run=cmd_quantize)

    c = sub.add_parser("conform", help="check an implementation of PaliGemma against the reference, rule by rule",
                       description="Runs the conformance catalogue (tiny checkpoints + inputs, each exercising one rule "
                                   "of PaliGemma) through an implementation and names the first activation where it "
                                   "departs from refpg's reference, and the rule that points to. Exit code 1 when a "
                                   "case fails.")
    c.add_argument("--impl", metavar="SPEC", help="refpg[:BACKEND] | transformers | mlx-vlm | dump:DIR")
    c.add_argument("--cases", nargs="+", metavar="NAME", help="run only these cases (see --list)")
    c.add_argument("--tol", type=float, default=1e-3, help="max rel error allowed per activation (default 1e-3)")
    c.add_argument("--json", metavar="FILE", help="write one record per case")
    c.add_argument("--keep", metavar="DIR", help="write the case checkpoints here and keep them")
    c.add_argument("--list", action="store_true", help="list the cases and the rule each exercises")
    c.add_argument("--write-cases", metavar="DIR", help="write checkpoints and inputs for an implementation refpg "
                                                         "cannot run (then compare its dumps with --impl dump:DIR)")
    c.add_argument("--model", default=None, metavar="DIR",
                   help="run the rules on this checkpoint instead of the catalogue")
    c.add_argument("--image", default=None, help="with --model: the image (default: a scene of coloured shapes)")
    c.add_argument("--prompt", default="caption en", help="with --model: the prompt (default: caption en)")
    c.add_argument("--reference", default="auto", metavar="BACKEND",
                   help="with --model: the backend refpg's reference runs on (default auto: cpp where built)")
    c.set_defaults(run=cmd_conform)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    except USER_ERRORS as e:
        sys.stdout.flush()
        log(f"refpg: error: {e}")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
