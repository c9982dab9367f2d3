#!/usr/bin/env python3
"""Evaluate the demo model (refpg/data/demo) on held-out scenes with the NumPy reference.

Scenes 0–299 of refpg.scenes (training used seeds from 1000 up) are asked every question
`refpg.scenes.tasks` lists; answers are decoded greedily through refpg's own path — `Processor`
(left-padded batches) and `PaliGemma.generate` — and scored:

    caption    exact match of the whole caption ("a red circle and a blue square"), also split
               into scenes where two objects share a colour and scenes where none do
    counting   exact match ("one" / "two" / "three")
    colour     exact match ("blue")
    detection  fraction of objects whose first predicted box (refpg.detection.parse_detections)
               has the object's label and IoU >= 0.7 with the true box ("detect red circle")
               (and, "detection@0.5", with IoU >= 0.5: issue 20's measure)
    all boxes  fraction of scenes whose multi-class detection ("detect circle ; square ; triangle")
               lists every object, left to right, each with its shape and IoU >= 0.7
    mask IoU   where the model has a VQ-VAE (vae.npz beside it), "segment red circle" is asked of
               every object: the mean IoU of the decoded mask (refpg.segmentation) with the object's
               true pixels (coverage > 1/2); an answer that does not decode, or names another object,
               counts 0

    python tools/eval_demo.py                      # ~30 s on one thread
    python tools/eval_demo.py --model /tmp/demo --scenes 50 --show-errors 10
    python tools/eval_demo.py --model /tmp/demo-v2 --world free  # shapes of any size, anywhere
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "refpg", "data", "demo")
MAX_NEW_TOKENS = {"caption": 16, "count": 4, "colour": 4, "detect": 10, "detect all": 24,
                  "segment": 26}  # answers <= 12/1/1/6/19/22
NAMES = {"caption": "caption", "count": "counting", "colour": "colour", "detect": "detection",
         "detect all": "all boxes", "segment": "mask IoU"}


def evaluate(model_dir: str, seeds, backend: str = "numpy", batch_size: int = 64, show_errors: int = 0,
             log=print, world: str = "grid") -> dict[str, float]:
    """{"caption", "counting", "colour", "detection", "detection@0.5", "all boxes"[, "mask IoU"]} ->
    fraction correct (mean IoU for masks), on the scenes of `seeds` in `world`."""
    from refpg import PaliGemma, Processor, scenes
    from refpg.detection import iou, parse_detections
    from refpg.segmentation import load_vae

    proc = Processor.from_pretrained(model_dir)
    model = PaliGemma.from_pretrained(model_dir, backend=backend)
    vae = load_vae(beside=model_dir)
    rows = {kind: [] for kind in MAX_NEW_TOKENS if kind != "segment" or vae is not None}  # kind -> [(scene, prompt, answer)]
    for seed in seeds:
        scene = scenes.scene_for_seed(seed, scenes.WORLDS[world])
        for prompt, answer in scenes.tasks(scene, vae):
            rows[scenes.task_kind(prompt)].append((scene, prompt, answer))

    right = {kind: 0 for kind in rows}
    loose = 0  # detections of the right label with IoU >= 0.5
    errors = []
    same_colour = {}  # whether a caption's scene has two objects of one colour -> [right, asked]
    for kind, items in rows.items():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = proc(images=[s.image for s, _, _ in chunk], prompts=[p for _, p, _ in chunk])
            ids = model.generate(batch, max_new_tokens=MAX_NEW_TOKENS[kind])
            for (scene, prompt, answer), row in zip(chunk, ids):
                text = proc.decode(row)
                ok = scenes.is_right(prompt, answer, text) if kind != "segment" else \
                    scenes.mask_iou(scene, prompt, text, vae)
                right[kind] += ok
                if kind == "detect":
                    truth, found = parse_detections(answer, scenes.SIZE, scenes.SIZE)[0], \
                        parse_detections(text, scenes.SIZE, scenes.SIZE)[:1]
                    loose += bool(found) and found[0].label == truth.label and iou(found[0], truth) >= 0.5
                ok = ok >= 0.5 if kind == "segment" else ok
                if kind == "caption":
                    tally = same_colour.setdefault(scenes.shares_a_colour(scene), [0, 0])
                    tally[0] += ok
                    tally[1] += 1
                if not ok:
                    errors.append((prompt, answer, text))
    result = {NAMES[k]: right[k] / max(1, len(rows[k])) for k in rows}
    result["detection@0.5"] = loose / max(1, len(rows["detect"]))
    for k in rows:
        if k == "segment":
            log(f"{NAMES[k]:10s} {result[NAMES[k]]:8.3f}   (mean over {len(rows[k])} objects)")
            continue
        what = {"detect": " objects right", "detect all": " scenes with every object right"}.get(k, "")
        log(f"{NAMES[k]:10s} {100 * result[NAMES[k]]:6.1f} %   ({right[k]}/{len(rows[k])}{what})")
        if k == "detect":
            log(f"  at IoU >= 0.5: {100 * result['detection@0.5']:.1f} % ({loose}/{len(rows[k])})")
    for shared, (ok, asked) in sorted(same_colour.items()):
        log(f"  caption, {'two objects of one colour' if shared else 'every object its own colour'}: "
            f"{100 * ok / asked:.1f} % ({ok}/{asked})")
    for prompt, answer, text in errors[:show_errors]:
        log(f"  wrong: {prompt!r}: expected {answer!r}, got {text!r}")
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory (default {DEFAULT_MODEL})")
    ap.add_argument("--scenes", type=int, default=300, help="how many held-out scenes (seeds 0…N-1; N <= 1000)")
    ap.add_argument("--backend", default="numpy", help="refpg backend selection (default numpy: the reference)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--show-errors", type=int, default=0, metavar="N", help="print the first N wrong answers")
    ap.add_argument("--world", default="grid", help="where the scenes' shapes sit (refpg.scenes.WORLDS: grid, free)")
    args = ap.parse_args(argv)
    if not 0 < args.scenes <= 1000:
        ap.error("--scenes must be in 1…1000 (seeds from 1000 up are training scenes)")
    t0 = time.perf_counter()
    if args.world not in ("grid", "free"):
        ap.error(f"--world must be grid or free, not {args.world!r}")
    evaluate(args.model, range(args.scenes), args.backend, args.batch_size, args.show_errors, world=args.world)
    print(f"{args.scenes} held-out scenes in {time.perf_counter() - t0:.0f} s ({args.backend} backend)")


if __name__ == "__main__":
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # one BLAS thread: the machine is shared (set before NumPy loads)
    sys.path.insert(0, ROOT)
    main()
