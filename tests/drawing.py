"""Digits as pen strokes, for tests that draw on a pad: polylines in a unit box (x right, y
down), placed side by side like a written number. Also numbers and doodles written on paper
with a synthetic pen, unlike anything the generator composes (no MNIST digit, no generator
mark), for checking the shipped model on images built differently from its training world."""

from __future__ import annotations

import math

import numpy as np
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
    "1": [[(0.3, 0.15), (0.6, 0.0), (0.6, 1.0)]],
    "3": [
        [
            *_arc(0.45, 0.27, 0.4, 0.25, -0.9 * math.pi, 0.5 * math.pi),
            *_arc(0.45, 0.73, 0.45, 0.27, -0.5 * math.pi, 0.9 * math.pi),
        ]
    ],
    "4": [[(0.7, 1.0), (0.7, 0.0), (0.0, 0.65), (0.95, 0.65)]],
    "5": [[(0.9, 0.0), (0.2, 0.0), (0.15, 0.45)], _arc(0.5, 0.68, 0.42, 0.32, -0.75 * math.pi, 0.85 * math.pi)],
    "7": [[(0.0, 0.0), (0.95, 0.0), (0.35, 1.0)]],
    "8": [_arc(0.5, 0.25, 0.32, 0.25, 0, 2 * math.pi), _arc(0.5, 0.73, 0.42, 0.27, 0, 2 * math.pi)],
    "9": [_arc(0.5, 0.3, 0.4, 0.28, 0, 2 * math.pi), [(0.9, 0.3), (0.75, 1.0)]],
}


def number_strokes(number: str, *, left: float, top: float, height: float) -> list[list[tuple[float, float]]]:
    """Pad coordinates of the strokes writing `number` in a row, digits `height` pixels high."""
    width, gap = 0.6 * height, 0.3 * height
    strokes = []
    for i, digit in enumerate(number):
        x0 = left + i * (width + gap)
        strokes += [[(x0 + x * width, top + y * height) for x, y in stroke] for stroke in UNIT_STROKES[digit]]
    return strokes


def scribble_strokes(*, left: float, top: float, size: float) -> list[list[tuple[float, float]]]:
    """One tangle of sharp turns that crosses itself, size pixels across: a mark that is no digit
    (like the generator's "scribble"), the same every time."""
    turns = [(math.cos(2.4 * i) * (0.3 + 0.7 * (i % 3) / 2), math.sin(2.4 * i + 0.5)) for i in range(30)]
    return [[(left + size * (0.5 + 0.5 * x), top + size * (0.5 + 0.5 * y)) for x, y in turns]]


def draw_on_pad(strokes: list[list[tuple[float, float]]], size: tuple[int, int], pen_width: int) -> Image.Image:
    """What a drawing pad returns: black strokes on a transparent RGBA image."""
    pad = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(pad)
    for stroke in strokes:
        draw.line(stroke, fill="black", width=pen_width, joint="curve")
        for x, y in (stroke[0], stroke[-1]):  # round pen ends
            draw.ellipse((x - pen_width / 2, y - pen_width / 2, x + pen_width / 2, y + pen_width / 2), fill="black")
    return pad


def written_number(rng: np.random.Generator, number: str, size: tuple[int, int] = (600, 260)) -> Image.Image:
    """`number` written on light paper with a pen 3-18 px wide: glyph strokes with a random
    height, width, gap and slant, each point a little off, dark ink on light grey ("L")."""
    h = rng.uniform(40, 110)
    w, gap = rng.uniform(0.45, 0.7) * h, rng.uniform(0.15, 0.45) * h
    scale = min(1.0, (size[0] - 20) / (len(number) * (w + gap)))
    h, w, gap = h * scale, w * scale, gap * scale
    left = rng.uniform(5, max(6, size[0] - len(number) * (w + gap)))
    top, slant, pen = rng.uniform(5, size[1] - h - 5), rng.uniform(-0.25, 0.25), int(rng.integers(3, 19))
    paper = Image.new("L", size, int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(paper)
    for i, digit in enumerate(number):
        x0, y0 = left + i * (w + gap) + rng.normal(0, 0.05 * w), top + rng.normal(0, 0.05 * h)
        for stroke in UNIT_STROKES[digit]:
            points = [
                (x0 + (x + rng.normal(0, 0.02)) * w + slant * (1 - y) * h * 0.3, y0 + (y + rng.normal(0, 0.02)) * h)
                for x, y in stroke
            ]
            draw.line(points, fill=int(rng.integers(0, 60)), width=pen, joint="curve")
    return paper


DOODLES = ("triangle", "arrow", "heart", "check", "wave", "zigzag", "cloud", "grid", "diamond")


def doodle(rng: np.random.Generator, kind: str, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A doodle of one of DOODLES, 60-180 px across, black on white with a 2-13 px pen."""
    paper = Image.new("L", size, 255)
    draw = ImageDraw.Draw(paper)
    cx, cy, r, pen = rng.uniform(120, 280), rng.uniform(100, 200), rng.uniform(30, 90), int(rng.integers(2, 14))

    def line(points: list[tuple[float, float]]) -> None:
        draw.line(points, fill=0, width=pen, joint="curve")

    if kind == "triangle":
        turn = rng.uniform(0, 2 * math.pi)
        line([(cx + r * math.cos(a + turn), cy + r * math.sin(a + turn)) for a in np.linspace(0, 2 * math.pi, 4)])
    elif kind == "arrow":
        line([(cx - r, cy), (cx + r, cy)])
        line([(cx + r * 0.6, cy - r * 0.4), (cx + r, cy), (cx + r * 0.6, cy + r * 0.4)])
    elif kind == "heart":
        line(
            [
                (
                    cx + r / 17 * 16 * math.sin(a) ** 3,
                    cy - r / 17 * (13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)),
                )
                for a in np.linspace(0, 2 * math.pi, 60)
            ]
        )
    elif kind == "check":
        line([(cx - r, cy), (cx - r * 0.3, cy + r * 0.6), (cx + r, cy - r * 0.8)])
    elif kind == "wave":
        line([(cx - 1.5 * r + i * 3 * r / 40, cy + 0.3 * r * math.sin(i / 40 * 4 * math.pi)) for i in range(41)])
    elif kind == "zigzag":
        line([(cx - 1.5 * r + i * 3 * r / 8, cy + (0.3 if i % 2 else -0.3) * r) for i in range(9)])
    elif kind == "cloud":
        for a in np.linspace(0, 2 * math.pi, 7)[:-1]:
            x, y = cx + 0.6 * r * math.cos(a), cy + 0.4 * r * math.sin(a)
            draw.ellipse((x - 0.4 * r, y - 0.3 * r, x + 0.4 * r, y + 0.3 * r), outline=0, width=pen)
    elif kind == "grid":
        for k in range(4):
            line([(cx - r + k * 2 * r / 3, cy - r), (cx - r + k * 2 * r / 3, cy + r)])
            line([(cx - r, cy - r + k * 2 * r / 3), (cx + r, cy - r + k * 2 * r / 3)])
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)], outline=0, width=pen)
    return paper
