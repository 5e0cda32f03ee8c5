"""Marks that are not digits, drawn for the model to learn to read them as nothing: shapes, letters,
scribbles, hatching and doodles, none of which passes for a digit (looks_like_a_zero keeps out the
round ones), laid on a canvas by draw_marks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from augment import gaussian_blur, resize
from mnist import DIGIT_SIZE

# No plain rings (a "0"), vertical strokes (a "1"), letters that pass for digits (O, l, S, Z, B, g,
# q, ...), or shapes of two or three strokes (a "7", a "4").
MARK_KINDS = (
    "blob", "cross", "hatching", "star", "spiral", "face", "scribble", "rule", "letter",
    "outline", "zigzag", "wave", "scallops",
)  # fmt: skip
MARK_LETTERS = "ACEFHKMNRWXcekmnwx#@&%"


@functools.lru_cache(maxsize=64)
def mark_font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def hatching_lines(rng: np.random.Generator, cx: float, cy: float, length: float) -> list[list[tuple[float, float]]]:
    """Five to nine parallel strokes of that length about (cx, cy): dense and never upright,
    unlike a row of "1"s."""
    angle, lines = rng.uniform(-1.0, 1.0), int(rng.integers(5, 10))
    along, across = (math.cos(angle), math.sin(angle)), (-math.sin(angle), math.cos(angle))
    spacing, half = length / lines * 0.8, (along[0] * length / 2, along[1] * length / 2)
    segments = []
    for i in range(lines):
        mx, my = cx + (i - (lines - 1) / 2) * spacing * across[0], cy + (i - (lines - 1) / 2) * spacing * across[1]
        segments.append([(mx - half[0], my - half[1]), (mx + half[0], my + half[1])])
    return segments


def scribble_points(rng: np.random.Generator, box: tuple, heading: float) -> list[tuple[float, float]]:
    """A tangle inside box (x0, y0, x1, y1): many sharp turns, crossing itself."""
    x0, y0, x1, y1 = box
    rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
    point, points = ((x0 + x1) / 2, (y0 + y1) / 2), []
    for _ in range(int(rng.integers(25, 50))):
        heading += rng.uniform(-2.5, 2.5)
        step = rng.uniform(0.2, 0.5)
        point = (
            float(np.clip(point[0] + step * rx * math.cos(heading), x0, x1)),
            float(np.clip(point[1] + step * ry * math.sin(heading), y0, y1)),
        )
        points.append(point)
    return points


def doodle_points(
    kind: str, rng: np.random.Generator, centre: tuple[float, float], size: float, turn: float
) -> list[tuple[float, float]]:
    """The line of an outline, zigzag, wave or scalloped ring about centre, size the half-length of
    the box's longer side: drawn whatever the box's shape, since the cell holds them and squeezed
    into a narrow box they would be a "1"."""
    cx, cy = centre
    if kind == "outline":  # a closed polygon of 3-5 corners: corners are what a written 0 lacks
        corners, squash = int(rng.integers(3, 6)), rng.uniform(0.6, 1.0)  # squashed further, a sliver reads as 1
        angles = np.linspace(0, 2 * math.pi, corners, endpoint=False) + turn + rng.uniform(-0.3, 0.3, corners)
        radii = rng.uniform(0.6, 1.0, corners) * size
        points = [(cx + r * math.cos(a), cy + squash * r * math.sin(a)) for a, r in zip(angles, radii)]
        return [*points, points[0], points[1]]
    if kind == "scallops":  # a ring of 5-9 bumps, each deep enough that it is no 0
        bumps, depth, squash = int(rng.integers(5, 10)), rng.uniform(0.2, 0.35), rng.uniform(0.7, 1.0)
        angles = np.linspace(0, 2 * math.pi, 12 * bumps + 1)
        radii = size * (1 - depth + depth * np.abs(np.sin(bumps * angles / 2)))
        return [(cx + r * math.cos(a + turn), cy + squash * r * math.sin(a + turn)) for a, r in zip(angles, radii)]
    # level, as a row of "1"s, "S"s or "Z"s never is: 4-8 strokes, or 1.5-3.5 swings
    if kind == "zigzag":
        along = np.linspace(-1, 1, int(rng.integers(5, 10)))
        across = np.where(np.arange(len(along)) % 2, 1.0, -1.0) * rng.uniform(0.5, 1.0, len(along))
    else:
        along = np.linspace(-1, 1, 60)
        across = np.sin(along * math.pi * rng.uniform(1.5, 3.5) + turn) * rng.uniform(0.4, 0.9)
    return [(cx + a * size, cy + b * 0.5 * size) for a, b in zip(along, across)]


def draw_mark(draw: ImageDraw.ImageDraw, kind: str, rng: np.random.Generator, box: tuple, width: int) -> None:
    """One mark of the given kind inside box (x0, y0, x1, y1) with a pen of that width."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    turn = rng.uniform(0, 2 * math.pi)

    def at(angle: float, radius: float) -> tuple[float, float]:
        return cx + radius * rx * math.cos(angle + turn), cy + radius * ry * math.sin(angle + turn)

    if kind == "blob":
        draw.polygon([at(a, rng.uniform(0.6, 1.0)) for a in np.linspace(0, 2 * math.pi, 12, endpoint=False)], fill=255)
    elif kind == "cross":
        for a in (0, math.pi / 2):
            draw.line([at(a, 1), at(a + math.pi, 1)], fill=255, width=width)
    elif kind == "hatching":
        for segment in hatching_lines(rng, cx, cy, 2 * min(rx, ry)):
            draw.line(segment, fill=255, width=width)
    elif kind == "star":
        arms = int(rng.integers(5, 9))
        if rng.random() < 0.5:  # an asterisk
            for a in np.linspace(0, math.pi, arms // 2 + 1, endpoint=False):
                draw.line([at(a, 1), at(a + math.pi, 1)], fill=255, width=width)
        else:  # a star outline
            points = [
                at(a, 1.0 if i % 2 == 0 else 0.45) for i, a in enumerate(np.linspace(0, 2 * math.pi, 2 * arms + 1))
            ]
            draw.line(points, fill=255, width=width, joint="curve")
    elif kind == "spiral":
        turns = rng.uniform(2, 4)
        angles = np.linspace(0, 2 * math.pi * turns, 80)
        draw.line([at(a, 0.1 + 0.9 * a / angles[-1]) for a in angles], fill=255, width=width, joint="curve")
    elif kind == "face":
        draw.ellipse(box, outline=255, width=width)
        for side in (-1, 1):
            ex, ey = cx + side * 0.35 * rx, cy - 0.3 * ry
            draw.ellipse((ex - 0.1 * rx - 1, ey - 0.1 * ry - 1, ex + 0.1 * rx + 1, ey + 0.1 * ry + 1), fill=255)
        mouth = (cx - 0.5 * rx, cy - 0.2 * ry, cx + 0.5 * rx, cy + 0.6 * ry)
        draw.arc(mouth, 20, 160, fill=255, width=width)
    elif kind in ("outline", "zigzag", "wave", "scallops"):
        points = doodle_points(kind, rng, (cx, cy), max(rx, ry), turn)
        draw.line(points, fill=255, width=width, joint="curve")
    elif kind == "scribble":
        draw.line(scribble_points(rng, box, heading=turn), fill=255, width=width, joint="curve")
    elif kind == "rule":  # a level line or a box: never upright alone, which would be a "1"
        if rng.random() < 0.5:
            tilt = rng.uniform(-0.1, 0.1) * rx
            draw.line([(x0, cy - tilt), (x1, cy + tilt)], fill=255, width=width)
        else:  # wider than high: a tall narrow box would pass for a "0"
            draw.rectangle((x0, cy - min(ry, rx * 0.8), x1, cy + min(ry, rx * 0.8)), outline=255, width=width)
    else:  # a letter or sign that no one reads as a digit
        letter = MARK_LETTERS[int(rng.integers(len(MARK_LETTERS)))]
        draw.text(
            (cx, cy), letter, fill=255, font=mark_font(max(8, int(y1 - y0))), anchor="mm", stroke_width=width // 3
        )


# A hole that fills this share of its bounding box is round or boxy, as a 0's is (an ellipse fills
# pi/4 of its box); the hole of a triangle or a diamond fills half.
ROUND_HOLE = 0.6


def looks_like_a_zero(cell: np.ndarray) -> bool:
    """Whether the ink of a 28x28 cell is one closed loop round one wide hole, as a 0 is: a box, a
    rounded outline, a shallow scalloped ring. Read as "nothing" in training, such a mark would
    teach the model that a lone 0 is no digit."""
    from scipy import ndimage  # imported here, as in measure_ink

    ink = cell > 64
    if ndimage.label(ink, structure=np.ones((3, 3)))[1] != 1:
        return False
    background, count = ndimage.label(~ink)  # 4-connected, so a diagonal gap in a stroke does not open a loop
    outside = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    holes = [k for k in range(1, count + 1) if k not in outside]
    if len(holes) != 1:
        return False
    hole_ys, hole_xs = np.nonzero(background == holes[0])
    ink_ys, ink_xs = np.nonzero(ink)
    hole_h, hole_w = np.ptp(hole_ys) + 1, np.ptp(hole_xs) + 1
    wide = hole_h >= 0.4 * (np.ptp(ink_ys) + 1) and hole_w >= 0.4 * (np.ptp(ink_xs) + 1)
    return bool(wide and len(hole_ys) >= ROUND_HOLE * hole_h * hole_w)


def draw_mark_cell(rng: np.random.Generator) -> np.ndarray:
    """A mark (draw_one_mark_cell), drawn again while it would pass for a 0 (looks_like_a_zero)."""
    while looks_like_a_zero(cell := draw_one_mark_cell(rng)):
        pass
    return cell


def draw_one_mark_cell(rng: np.random.Generator) -> np.ndarray:
    """One mark of a random kind (MARK_KINDS) drawn as MNIST drew its digits: in a box of a 28x28
    cell, its longer side 20 px and never upright and narrow, with a pen 1-3 px wide, drawn four
    times larger and area-averaged down, then slightly blurred, so that its strokes have a digit's
    graded edges."""
    scale, cell, longest = 4, DIGIT_SIZE, 20
    w, h = longest, longest * (rng.uniform(0.7, 1.0) if rng.random() < 0.5 else rng.uniform(0.15, 1.0))
    if h >= 0.5 * w and rng.random() < 0.5:  # upright only if not narrow: a tall narrow mark is a "1" or a "0"
        w, h = h, w
    x0, y0 = (cell - w) / 2 * scale, (cell - h) / 2 * scale
    image = Image.new("L", (cell * scale, cell * scale), 0)
    kind = MARK_KINDS[int(rng.integers(len(MARK_KINDS)))]
    pen = max(2, round(rng.uniform(1.0, 3.0) * scale))
    draw_mark(ImageDraw.Draw(image), kind, rng, (x0, y0, x0 + w * scale, y0 + h * scale), width=pen)
    small = torch.from_numpy(np.array(image.resize((cell, cell), Image.Resampling.BOX), np.float32))[None]
    blurred = gaussian_blur(small, float(rng.uniform(0.3, 0.8)), kernel_size=3)[0]
    return (blurred * (255 / blurred.max().clamp(min=1))).round().to(torch.uint8).numpy()


def draw_marks(
    rng: np.random.Generator, canvas_size: int, prepare: Callable[[np.ndarray, np.random.Generator], np.ndarray]
) -> np.ndarray:
    """A canvas of one to three marks that are not digits (draw_mark_cell), each prepared like a
    digit (`prepare`: the composer's augmentation, pen and cut to ink), so that the way a stroke is
    drawn never tells a mark from a digit, and scaled so that its 20 px box becomes 10 to 60 px
    across. Marks may overlap; nothing in them is a digit."""
    canvas = np.zeros((canvas_size, canvas_size), np.uint8)
    for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
        crop = prepare(draw_mark_cell(rng), rng)
        across = rng.uniform(10, min(60, canvas_size - 4)) / 20
        factor = min(across, (canvas_size - 4) / max(crop.shape))
        h, w = max(1, round(crop.shape[0] * factor)), max(1, round(crop.shape[1] * factor))
        y, x = int(rng.integers(2, canvas_size - h - 1)), int(rng.integers(2, canvas_size - w - 1))
        mark = resize(crop, h, w).astype(np.float32)
        mark *= crop.max() / max(1.0, mark.max())  # a hairline shrunk to a few pixels stays as bright as it was drawn
        np.maximum(canvas[y : y + h, x : x + w], mark.round().astype(np.uint8), out=canvas[y : y + h, x : x + w])
    return canvas
