"""Digits as pen strokes, for tests that draw on a pad: polylines in a unit box (x right, y
down), placed side by side like a written number."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw


def _arc(
    cx: float, cy: float, rx: float, ry: float, start: float, end: float, steps: int = 24
) -> list[tuple[float, float]]:
    """Points of an elliptical arc from angle start to end (radians; 0 = right, pi / 2 = down)."""
    return [
        (cx + rx * math.cos(start + (end - start) * i / steps), cy + ry * math.sin(start + (end - start) * i / steps))
        for i in range(steps + 1)
    ]


UNIT_STROKES: dict[str, list[list[tuple[float, float]]]] = {
    "0": [_arc(0.5, 0.5, 0.42, 0.48, -math.pi / 2, 1.5 * math.pi + 0.2)],
    # a hook over the top, a diagonal down to the left, a flat base
    "2": [[*_arc(0.5, 0.28, 0.4, 0.26, 1.1 * math.pi, 2.15 * math.pi), (0.05, 1.0), (0.98, 1.0)]],
    # down the left side from the top right, then the loop at the bottom
    "6": [[(0.85, 0.0), (0.55, 0.08), (0.25, 0.3), (0.1, 0.6), *_arc(0.5, 0.7, 0.4, 0.3, math.pi, 3 * math.pi)]],
}


def number_strokes(number: str, *, left: float, top: float, height: float) -> list[list[tuple[float, float]]]:
    """Pad coordinates of the strokes writing `number` in a row, digits `height` pixels high."""
    width, gap = 0.6 * height, 0.3 * height
    strokes = []
    for i, digit in enumerate(number):
        x0 = left + i * (width + gap)
        strokes += [[(x0 + x * width, top + y * height) for x, y in stroke] for stroke in UNIT_STROKES[digit]]
    return strokes


def draw_on_pad(strokes: list[list[tuple[float, float]]], size: tuple[int, int], pen_width: int) -> Image.Image:
    """What a drawing pad returns: black strokes on a transparent RGBA image."""
    pad = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(pad)
    for stroke in strokes:
        draw.line(stroke, fill="black", width=pen_width, joint="curve")
        for x, y in (stroke[0], stroke[-1]):  # round pen ends
            draw.ellipse((x - pen_width / 2, y - pen_width / 2, x + pen_width / 2, y + pen_width / 2), fill="black")
    return pad
