"""Location tokens <-> boxes in pixels, and drawing them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from refpg.detection import Box, draw_detections, format_detections, iou, parse_detections


def test_boxes_round_trip_through_location_tokens_within_one_bin():
    rng = np.random.default_rng(0)
    for width, height in [(224, 224), (640, 480), (37, 901)]:
        boxes = []
        for k in range(50):
            y0, y1 = sorted(rng.uniform(0, height, 2))
            x0, x1 = sorted(rng.uniform(0, width, 2))
            boxes.append(Box(f"thing {k}", y0, x0, y1, x1))
        back = parse_detections(format_detections(boxes, width, height), width, height)
        assert [b.label for b in back] == [b.label for b in boxes]
        for a, b in zip(boxes, back):
            for c, d, size in ((a.y0, b.y0, height), (a.x0, b.x0, width), (a.y1, b.y1, height), (a.x1, b.x1, width)):
                assert 0 <= c - d < size / 1024 + 1e-9  # floor to the bin, back to its start


def test_parse_reads_paligemma_answers():
    text = "<loc0000><loc0256><loc0512><loc1023> red circle ; <loc0100><loc0100><loc0200><loc0300> cat"
    boxes = parse_detections(text, width=200, height=100)
    assert boxes[0] == Box("red circle", 0.0, 50.0, 50.0, 1023 / 1024 * 200)
    assert boxes[1].label == "cat" and boxes[1].x1 == pytest.approx(300 / 1024 * 200)
    assert parse_detections("a cat on a mat", 10, 10) == []
    assert parse_detections("<loc0001><loc0002> truncated", 10, 10) == []


def test_iou():
    a = Box("a", 0, 0, 10, 10)
    assert iou(a, a) == 1.0
    assert iou(a, Box("b", 0, 5, 10, 15)) == pytest.approx(50 / 150)
    assert iou(a, Box("c", 20, 20, 30, 30)) == 0.0


def test_draw_writes_the_boxes_onto_the_image(tmp_path):
    image = Image.new("RGB", (100, 80), "white")
    out = tmp_path / "boxes.png"
    draw_detections(image, [Box("square", 20, 30, 60, 70)], str(out))
    drawn = np.asarray(Image.open(out))
    assert drawn.shape == (80, 100, 3)
    assert (drawn[40, 30] != 255).any() and (drawn[40, 50] == 255).all()  # the edge is drawn, the inside not
