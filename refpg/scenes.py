"""A synthetic visual world for the shipped demo model: coloured shapes on light backgrounds.

`make_scene(rng, world=...)` draws a 64×64 RGB picture of one to three shapes (circle, square,
triangle) in five distinct hues (red, green, blue, yellow, purple), at most one of each
(colour, shape) pair, on a light background (solid, gradient or mildly noisy, never a saturated
colour). Where the shapes sit is the `World`'s:

    GRID_WORLD  sides 16, 24, 32 px, box edges on the vision tower's 8-pixel patch grid, boxes
                8 px apart (the world of the demo model shipped today: on the grid, a 4-pixel grid
                proved too hard to learn in a 40-minute CPU training)
    FREE_WORLD  any side from 10 to 40 px, anywhere (whole pixels), boxes 2 px apart (issue 20's)

and in both, shape centres are at least 8 px apart horizontally, so "left to right" is never
ambiguous. `tasks(scene)` lists the questions PaliGemma's prompt formats ask about it, each with
its one canonical answer:

    caption en                         -> "a red circle and a blue square"   (objects left to right)
    detect red circle                  -> "<loc0128><loc0256><loc0512><loc0640> red circle"
    answer en how many shapes          -> "one" | "two" | "three"
    answer en what color is the square -> "blue"   (asked only of a shape kind present exactly once)
    detect circle ; square ; triangle  -> "<loc…>×4 square ; <loc…>×4 circle"   (every object, left to right)
    segment red circle                 -> "<loc…>×4 <seg…>×16 red circle"   (given a VQ-VAE: the codes
                                          of the object's mask in its box, refpg.segmentation)

Shapes are drawn at 4× resolution and box-filtered down (anti-aliased edges); a box is the shape's
bounding box in pixel-edge coordinates (x1 = x0 + width), and `scene.masks` holds the fraction of
each pixel each shape covers. Everything is a pure function of the generator passed in:
`make_scene(np.random.default_rng(seed))` is the same picture on every machine.
Depends on NumPy and Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import PIL.Image
import PIL.ImageDraw

from refpg.detection import Box, format_detections, iou, parse_detections

SIZE = 64            # image side, pixels
SUPERSAMPLE = 4


@dataclass(frozen=True)
class World:
    """Where shapes may sit: box edges on multiples of `grid`, sides from `sizes`, at least `gap`
    pixels between two boxes and `min_dx` between two centres horizontally."""
    name: str
    grid: int
    sizes: tuple[int, ...]
    gap: int
    min_dx: int


# The shipped demo model's world: edges on the vision tower's 8-pixel patch grid.
GRID_WORLD = World("grid", grid=8, sizes=(16, 24, 32), gap=8, min_dx=8)
# Issue 20's: any side from 10 to 40 px, anywhere (whole pixels), boxes 2 px apart.
FREE_WORLD = World("free", grid=1, sizes=tuple(range(10, 41)), gap=2, min_dx=8)
WORLDS = {w.name: w for w in (GRID_WORLD, FREE_WORLD)}
GRID, GAP, MIN_DX = GRID_WORLD.grid, GRID_WORLD.gap, GRID_WORLD.min_dx

COLOURS = {  # distinct hues, all far from the light, unsaturated backgrounds
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 55, 175),
}
SHAPES = ("circle", "square", "triangle")
IOU_RIGHT = 0.7      # a detected box counts as right from this IoU with the true box (and the right label)
NUMBERS = {1: "one", 2: "two", 3: "three"}

# The prompts, in PaliGemma's formats.
CAPTION = "caption en"
COUNT = "answer en how many shapes"
DETECT_ALL = "detect " + " ; ".join(SHAPES)  # PaliGemma's multi-class detection: every shape, labelled by kind


def detect_prompt(colour: str, shape: str) -> str:
    return f"detect {colour} {shape}"


def segment_prompt(colour: str, shape: str) -> str:
    return f"segment {colour} {shape}"


def colour_prompt(shape: str) -> str:
    return f"answer en what color is the {shape}"


@dataclass(frozen=True)
class Scene:
    image: PIL.Image.Image
    objects: list[tuple[str, str, Box]]  # (colour, shape, box), left to right; box.label = "colour shape"
    masks: list[np.ndarray]              # per object, float32 [S, S]: the fraction of each pixel it covers


# ---------------------------------------------------------------- drawing


def background(rng: np.random.Generator) -> np.ndarray:
    """[S, S, 3] uint8: a light, nearly grey background — solid, a gradient, or mild noise."""
    base = rng.uniform(200, 245) + rng.uniform(-10, 10, size=3)          # light, slightly tinted
    kind = rng.integers(3)
    if kind == 0:
        img = np.broadcast_to(base, (SIZE, SIZE, 3))
    elif kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5              # [-0.5, 0.5]
        ramp = np.cos(angle) * xx + np.sin(angle) * yy                    # [S, S]
        img = base + rng.uniform(10, 35) * ramp[..., None]
    else:
        img = base + rng.normal(0, 5, size=(SIZE, SIZE, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def shape_colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """The named colour with a little jitter, so the model learns hues, not exact values."""
    rgb = np.clip(np.asarray(COLOURS[name]) + rng.integers(-15, 16, size=3), 0, 255)
    return tuple(int(c) for c in rgb)


def draw_shape(draw: PIL.ImageDraw.ImageDraw, shape: str, box: Box, fill: tuple[int, int, int]) -> None:
    """Fill `shape` so that its bounding box is exactly `box` (on the supersampled canvas)."""
    k = SUPERSAMPLE
    x0, y0, x1, y1 = box.x0 * k, box.y0 * k, box.x1 * k - 1, box.y1 * k - 1  # PIL's boxes include x1, y1
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":  # apex up, base along the bottom edge
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------- sampling


def _fits(box: Box, others: list[Box], world: World) -> bool:
    cx = (box.x0 + box.x1) / 2
    gap = world.gap
    for o in others:
        apart = (box.x1 + gap <= o.x0 or o.x1 + gap <= box.x0 or box.y1 + gap <= o.y0 or o.y1 + gap <= box.y0)
        if not apart or abs(cx - (o.x0 + o.x1) / 2) < world.min_dx:
            return False
    return True


def _place(rng: np.random.Generator, n: int, world: World) -> list[tuple[int, int, int]] | None:
    """n non-overlapping squares (x0, y0, size) with edges on the world's grid, or None if this
    attempt got stuck."""
    placed: list[Box] = []
    out = []
    for _ in range(n):
        for _attempt in range(50):
            size = int(rng.choice(world.sizes))
            cells = (SIZE - size) // world.grid + 1
            x0, y0 = (world.grid * int(c) for c in rng.integers(cells, size=2))
            box = Box("", y0, x0, y0 + size, x0 + size)
            if _fits(box, placed, world):
                placed.append(box)
                out.append((x0, y0, size))
                break
        else:
            return None
    return out


def coverage(shape: str, box: Box) -> np.ndarray:
    """float32 [S, S]: the fraction of each pixel that `shape` filling `box` covers (drawn as the
    image draws it, at 4× and box-filtered)."""
    canvas = PIL.Image.new("L", (SIZE * SUPERSAMPLE,) * 2, 0)
    draw_shape(PIL.ImageDraw.Draw(canvas), shape, box, 255)
    return np.asarray(canvas.resize((SIZE, SIZE), PIL.Image.Resampling.BOX), np.float32) / 255.0


def make_scene(rng: np.random.Generator, n_objects: int | None = None, world: World = GRID_WORLD) -> Scene:
    """A random scene of `world`; `n_objects` (1–3) defaults to uniform over 1, 2, 3."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"a scene has 1 to 3 objects, not {n}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    kinds = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]  # distinct (colour, shape)
    places = None
    while places is None:
        places = _place(rng, n, world)

    canvas = PIL.Image.fromarray(background(rng)).resize((SIZE * SUPERSAMPLE,) * 2, PIL.Image.Resampling.NEAREST)
    draw = PIL.ImageDraw.Draw(canvas)
    objects = []
    for (colour, shape), (x0, y0, size) in zip(kinds, places):
        box = Box(f"{colour} {shape}", float(y0), float(x0), float(y0 + size), float(x0 + size))
        draw_shape(draw, shape, box, shape_colour(colour, rng))
        objects.append((colour, shape, box))
    image = canvas.resize((SIZE, SIZE), PIL.Image.Resampling.BOX)  # averages each 4×4 block: anti-aliased
    objects.sort(key=lambda o: o[2].x0 + o[2].x1)                   # left to right
    return Scene(image, objects, [coverage(shape, box) for _, shape, box in objects])


def box_mask(mask: np.ndarray, box: Box) -> np.ndarray:
    """float32 [64, 64]: an object's coverage inside its box, resized (bilinear) to the 64 × 64 mask a
    segmentation answer's <seg> codes stand for (big_vision's training data: the box's crop of the mask)."""
    crop = mask[int(box.y0):int(box.y1), int(box.x0):int(box.x1)]
    return np.asarray(PIL.Image.fromarray(np.ascontiguousarray(crop, np.float32)).resize((64, 64), PIL.Image.BILINEAR),
                      np.float32)


# ---------------------------------------------------------------- questions and answers


def caption(scene: Scene) -> str:
    """"a red circle", "a red circle and a blue square", "a red circle, a blue square and a …"."""
    names = [f"a {colour} {shape}" for colour, shape, _ in scene.objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def shares_a_colour(scene: Scene) -> bool:
    """Whether two of the scene's objects have one colour (then only their shapes tell them apart)."""
    colours = [colour for colour, _, _ in scene.objects]
    return len(set(colours)) < len(colours)


def tasks(scene: Scene, vae=None) -> list[tuple[str, str]]:
    """Every (prompt, answer) the demo model is trained on, for this scene; with a VQ-VAE
    (refpg.segmentation.VQVAE, encoder included) also each object's segmentation."""
    out = [(CAPTION, caption(scene)), (COUNT, NUMBERS[len(scene.objects)])]
    for shape in SHAPES:
        colours = [c for c, s, _ in scene.objects if s == shape]
        if len(colours) == 1:
            out.append((colour_prompt(shape), colours[0]))
    for colour, shape, box in scene.objects:
        out.append((detect_prompt(colour, shape), format_detections([box], SIZE, SIZE)))
    out.append((DETECT_ALL, format_detections([replace(box, label=shape) for _, shape, box in scene.objects],
                                              SIZE, SIZE)))
    if vae is not None:
        from refpg.segmentation import encode_masks, format_segments

        codes = encode_masks(vae, np.stack([box_mask(m, box) for m, (_, _, box) in zip(scene.masks, scene.objects)]))
        for (colour, shape, box), c in zip(scene.objects, codes):
            out.append((segment_prompt(colour, shape), format_segments([(box, tuple(int(v) for v in c))], SIZE, SIZE)))
    return out


def task_kind(prompt: str) -> str:
    """"caption", "count", "colour", "detect", "detect all" or "segment": which question a prompt asks."""
    if prompt == CAPTION:
        return "caption"
    if prompt == COUNT:
        return "count"
    if prompt.startswith("answer en what color"):
        return "colour"
    if prompt == DETECT_ALL:
        return "detect all"
    if prompt.startswith("detect "):
        return "detect"
    if prompt.startswith("segment "):
        return "segment"
    raise ValueError(f"not a demo prompt: {prompt!r}")


def is_right(prompt: str, expected: str, answer: str) -> bool:
    """Whether `answer` is a right answer to `prompt`: the words exactly; for a detection, boxes with
    the expected labels, in the expected order, each of IoU >= IOU_RIGHT with its true box (only
    the first box is scored for a single object's detection: the model may add a second guess)."""
    kind = task_kind(prompt)
    if kind not in ("detect", "detect all"):
        return answer == expected
    truth = parse_detections(expected, SIZE, SIZE)
    found = parse_detections(answer, SIZE, SIZE)
    if kind == "detect":
        found = found[:1]
    return len(found) == len(truth) and all(f.label == t.label and iou(f, t) >= IOU_RIGHT
                                            for f, t in zip(found, truth))


def mask_iou(scene: Scene, prompt: str, answer: str, vae) -> float:
    """IoU of a `segment` answer's first mask (refpg.segmentation, decoded by `vae`) with the prompt's
    object's true pixels (coverage > 1/2); 0 if the answer names another object or does not decode."""
    from refpg.segmentation import parse_segments

    name = prompt.removeprefix("segment ")
    i = next(i for i, (colour, shape, _) in enumerate(scene.objects) if f"{colour} {shape}" == name)
    found = parse_segments(answer, SIZE, SIZE, vae)[:1]
    if not found or found[0].mask is None or found[0].label != name:
        return 0.0
    truth = scene.masks[i] > 0.5
    return float((found[0].mask & truth).sum() / (found[0].mask | truth).sum())


def scene_for_seed(seed: int, world: World = GRID_WORLD) -> Scene:
    """The scene of one integer seed (training, evaluation and the demo use disjoint seed ranges)."""
    return make_scene(np.random.default_rng(seed), world=world)
