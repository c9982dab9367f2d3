"""PaliGemma's detection answers: `<locY0><locX0><locY1><locX1> label ; …` <-> boxes in pixels.

Convention (Google's PaliGemma demos): a location token v in 0…1023 stands for v / 1024 of the
image side — y with the height, x with the width — so a box maps to tokens with floor(c · 1024 /
size) and back with v / 1024 · size. Decoding then encoding a box loses at most size / 1024 pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOC_BINS = 1024
_GROUP = re.compile(r"((?:<loc\d{4}>){4})\s*([^;<]*)")


@dataclass(frozen=True)
class Box:
    label: str
    y0: float
    x0: float
    y1: float
    x1: float


def parse_detections(text: str, width: int, height: int) -> list[Box]:
    """Every `<loc×4> label` group in text, as a box in the pixel coordinates of a width×height image."""
    boxes = []
    for locs, label in _GROUP.findall(text):
        y0, x0, y1, x1 = (int(v) for v in re.findall(r"<loc(\d{4})>", locs))
        boxes.append(Box(label.strip(), y0 / LOC_BINS * height, x0 / LOC_BINS * width,
                         y1 / LOC_BINS * height, x1 / LOC_BINS * width))
    return boxes


def loc_token(c: float, size: int) -> str:
    v = min(LOC_BINS - 1, max(0, int(c * LOC_BINS / size)))
    return f"<loc{v:04d}>"


def format_detections(boxes: list[Box], width: int, height: int) -> str:
    """The answer PaliGemma gives for these boxes (the inverse of parse_detections)."""
    return " ; ".join(loc_token(b.y0, height) + loc_token(b.x0, width) + loc_token(b.y1, height)
                      + loc_token(b.x1, width) + " " + b.label for b in boxes)


def iou(a: Box, b: Box) -> float:
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    inter = iy * ix
    union = (a.y1 - a.y0) * (a.x1 - a.x0) + (b.y1 - b.y0) * (b.x1 - b.x0) - inter
    return inter / union if union > 0 else 0.0


def draw_detections(image, boxes: list[Box], path: str, masks: list | None = None) -> None:
    """Save image (a PIL image) with each box and its label drawn on it; with `masks` (bool
    [height, width] arrays, one per box, or None), each mask filled semi-transparently in its box's colour."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = image.convert("RGB").copy()
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    if masks:
        pixels = np.asarray(img, np.float32)  # [H, W, 3]
        for i, mask in enumerate(masks):
            if mask is not None:
                pixels[mask] = 0.55 * pixels[mask] + 0.45 * np.array(palette[i % len(palette)], np.float32)
        img = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for i, b in enumerate(boxes):
        color = palette[i % len(palette)]
        draw.rectangle([b.x0, b.y0, b.x1, b.y1], outline=color, width=max(1, min(img.size) // 150))
        text_w = draw.textlength(b.label)
        draw.rectangle([b.x0, max(0, b.y0 - 11), b.x0 + text_w + 4, max(11, b.y0)], fill=color)
        draw.text((b.x0 + 2, max(0, b.y0 - 11)), b.label, fill="white")
    img.save(path)
