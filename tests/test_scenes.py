"""The demo's synthetic world (refpg.scenes) keeps the promises its docstring makes."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from refpg import scenes
from refpg.detection import Box, format_detections, parse_detections


def test_a_seed_is_the_same_scene_every_time():
    a, b = scenes.scene_for_seed(17), scenes.scene_for_seed(17)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.objects == b.objects


@pytest.mark.parametrize("world", scenes.WORLDS.values(), ids=scenes.WORLDS)
@pytest.mark.parametrize("seed", range(0, 300, 7))
def test_objects_are_distinct_on_the_grid_apart_and_left_to_right(seed, world):
    scene = scenes.scene_for_seed(seed, world)
    assert scene.image.size == (scenes.SIZE, scenes.SIZE)
    kinds = [(c, s) for c, s, _ in scene.objects]
    assert 1 <= len(kinds) <= 3 and len(set(kinds)) == len(kinds)
    centres = []
    for colour, shape, box in scene.objects:
        assert colour in scenes.COLOURS and shape in scenes.SHAPES and box.label == f"{colour} {shape}"
        assert all(v % world.grid == 0 and 0 <= v <= scenes.SIZE for v in (box.x0, box.y0, box.x1, box.y1))
        assert box.x1 - box.x0 == box.y1 - box.y0 in world.sizes
        centres.append((box.x0 + box.x1) / 2)
    assert centres == sorted(centres) and all(b - a >= world.min_dx for a, b in zip(centres, centres[1:]))
    boxes = [b for _, _, b in scene.objects]
    gap = world.gap
    for i, p in enumerate(boxes):
        for q in boxes[:i]:
            assert p.x1 + gap <= q.x0 or q.x1 + gap <= p.x0 or p.y1 + gap <= q.y0 or q.y1 + gap <= p.y0


@pytest.mark.parametrize("world", scenes.WORLDS.values(), ids=scenes.WORLDS)
@pytest.mark.parametrize("seed", range(0, 300, 29))
def test_each_shape_is_drawn_inside_its_box_in_its_colour(seed, world):
    scene = scenes.scene_for_seed(seed, world)
    pixels = np.asarray(scene.image).astype(int)
    covered = np.zeros(pixels.shape[:2], bool)
    for colour, shape, box in scene.objects:
        y0, x0, y1, x1 = (int(v) for v in (box.y0, box.x0, box.y1, box.x1))
        covered[y0:y1, x0:x1] = True
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        centre = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3)   # inside every shape kind
        assert np.abs(centre - scenes.COLOURS[colour]).max() <= 15, (colour, shape)  # up to its jitter
    assert pixels[~covered].min() >= 150                                 # light background elsewhere


@pytest.mark.parametrize("seed", range(0, 300, 37))
def test_each_mask_is_its_shapes_pixels_and_the_box_mask_its_crop(seed):
    scene = scenes.scene_for_seed(seed, scenes.FREE_WORLD)
    pixels = np.asarray(scene.image).astype(int)
    assert len(scene.masks) == len(scene.objects)
    for (colour, shape, box), mask in zip(scene.objects, scene.masks):
        assert mask.shape == (scenes.SIZE, scenes.SIZE) and mask.dtype == np.float32
        y0, x0, y1, x1 = (int(v) for v in (box.y0, box.x0, box.y1, box.x1))
        outside = np.ones_like(mask, bool)
        outside[y0:y1, x0:x1] = False
        assert mask[outside].max() == 0 and mask.max() == 1.0
        side = y1 - y0
        area = {"circle": np.pi * side ** 2 / 4, "square": side ** 2, "triangle": side ** 2 / 2}[shape]
        assert abs(mask.sum() - area) <= 0.05 * area + 2, (shape, side, mask.sum(), area)
        full = mask == 1.0  # the shape's own colour there, up to its jitter
        assert np.abs(pixels[full] - scenes.COLOURS[colour]).max() <= 15
        crop = scenes.box_mask(mask, box)
        assert crop.shape == (64, 64) and abs(crop.mean() - mask.sum() / side ** 2) <= 0.02


def test_the_free_world_puts_shapes_of_every_side_anywhere():
    sides, off_grid, edges = Counter(), 0, Counter()
    for seed in range(300):
        for _, _, box in scenes.scene_for_seed(seed, scenes.FREE_WORLD).objects:
            sides[int(box.x1 - box.x0)] += 1
            off_grid += box.x0 % 8 != 0 or box.y0 % 8 != 0
            edges[int(box.x0) % 8] += 1
    assert set(sides) == set(range(10, 41))
    assert off_grid > 0.8 * sum(sides.values()) and min(edges[r] for r in range(8)) >= 40


def test_the_grid_world_is_the_shipped_demo_models():
    """Masks are drawn without the generator: the grid world's scenes (the shipped model's
    training and evaluation data) are the pictures they always were."""
    image = np.asarray(scenes.scene_for_seed(506).image)
    assert image.shape == (64, 64, 3) and int(image.sum()) == 2132668  # its sum before the free world existed


def test_the_world_covers_every_colour_shape_count_and_size():
    seen = Counter()
    for seed in range(300):
        scene = scenes.scene_for_seed(seed)
        seen[len(scene.objects)] += 1
        for colour, shape, box in scene.objects:
            seen.update([colour, shape, int(box.x1 - box.x0)])
        seen["two of one colour"] += scenes.shares_a_colour(scene)
    for thing in (1, 2, 3, *scenes.COLOURS, *scenes.SHAPES, *scenes.GRID_WORLD.sizes, "two of one colour"):
        assert seen[thing] >= 30, thing


def test_caption_and_questions_follow_the_objects():
    for seed in range(50):
        scene = scenes.scene_for_seed(seed)
        qa = dict(scenes.tasks(scene))
        caption = qa[scenes.CAPTION]
        named = re.findall(r"a (\w+) (\w+)", caption)                  # in the order the caption says
        assert named == [(c, s) for c, s, _ in scene.objects]           # left to right
        assert re.sub(r"a \w+ \w+", "X", caption) == {1: "X", 2: "X and X", 3: "X, X and X"}[len(named)]
        assert qa[scenes.COUNT] == {1: "one", 2: "two", 3: "three"}[len(named)]
        for shape in scenes.SHAPES:
            owners = [c for c, s, _ in scene.objects if s == shape]
            assert qa.get(scenes.colour_prompt(shape)) == (owners[0] if len(owners) == 1 else None)
        for colour, shape, _ in scene.objects:
            assert qa[scenes.detect_prompt(colour, shape)].endswith(f"> {colour} {shape}")
        every = parse_detections(qa[scenes.DETECT_ALL], scenes.SIZE, scenes.SIZE)
        assert [b.label for b in every] == [s for _, s, _ in scene.objects]    # left to right, by kind
        for found, (_, _, b) in zip(every, scene.objects):                      # <loc1023> is 63.94 px, not 64
            assert [found.y0, found.x0, found.y1, found.x1] == pytest.approx([b.y0, b.x0, b.y1, b.x1], abs=0.07)


def test_is_right_scores_words_exactly_and_boxes_by_label_order_and_iou():
    scene = next(sc for sc in map(scenes.scene_for_seed, range(100)) if len(sc.objects) == 3)
    qa = dict(scenes.tasks(scene))
    for prompt, expected in qa.items():
        assert scenes.is_right(prompt, expected, expected)
    assert not scenes.is_right(scenes.COUNT, "two", "two ")
    colour, shape, box = scene.objects[0]
    one = scenes.detect_prompt(colour, shape)
    moved = Box(box.label, box.y0, box.x0 + 8, box.y1, box.x1 + 8)     # a cell to the right
    shrunk = Box(box.label, box.y0, box.x0, box.y1, box.x1 - 1)        # IoU 1 - 1/width >= 0.96
    assert scenes.is_right(one, qa[one], format_detections([shrunk], scenes.SIZE, scenes.SIZE))
    assert not scenes.is_right(one, qa[one], format_detections([moved], scenes.SIZE, scenes.SIZE))  # IoU <= 0.6
    assert not scenes.is_right(one, qa[one], qa[one].replace(shape, "hexagon"))
    assert scenes.is_right(one, qa[one], qa[one] + " ; " + qa[one])     # a second guess is not scored
    assert not scenes.is_right(one, qa[one], "")
    every = qa[scenes.DETECT_ALL].split(" ; ")
    assert not scenes.is_right(scenes.DETECT_ALL, qa[scenes.DETECT_ALL], " ; ".join(every[:2]))     # one missing
    assert not scenes.is_right(scenes.DETECT_ALL, qa[scenes.DETECT_ALL], " ; ".join(every[::-1]))   # out of order
