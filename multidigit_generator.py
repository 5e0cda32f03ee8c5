"""Compose MNIST digits into multi-digit images, as a library and as a command.

Two layouts (and "mixed", either one at random per image), both white digits on a black canvas
(96x96 by default), 0-4 digits each:
  scatter  digits dropped at random, their ink boxes never overlapping or touching; the label
           reads them left to right by centre, and placements whose centres are horizontally
           closer than --min-center-gap are redrawn so that order is never ambiguous.
  row      a number written left to right, all digits about one height, with random gaps
           and a little vertical jitter.
Every digit is augmented first (augment.py: small rotation, shear, scale; thinner or thicker strokes),
then cropped to its ink and scaled to an ink height within --digit-height (18-28 px by
default) in both layouts, so that nothing the model sees keeps MNIST's own normalisation
(every digit in a 20x20 box, centred by mass).

Stress options (used by split_multidigit_dataset.py --stress, off by default) change the
strokes, the digit proportions or the placement, or degrade the image like a scan. The wider
world training draws from (also off by default, so that evaluation sets hold digits as
written) redraws digits with a round pen, lays composites on imperfect paper, writes touching
rows, composes marks that are not digits (label "") and more digits than the model reads.

All randomness comes from one seed: image i of a dataset is drawn with
numpy.random.default_rng([seed, i]), so the same seed gives the same bytes whatever the
order or the number of processes. Training uses the same composer to draw fresh
composites every epoch (datasets.py), so it never sees the same composite twice.

    uv run python multidigit_generator.py --split test --num-images 1000 --out data/demo
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

import augment
import marks
from datasets import DATASET_FILES, write_dataset
from files import CommandLine, check_destination
from mnist import DIGIT_SIZE, MnistUnavailableError, default_mnist_root, load_mnist, read_digit_indices

LAYOUTS = ("scatter", "row", "mixed")
DIGIT_HEIGHT_RANGE = (18, 28)  # default ink height of a composed digit, in pixels
MIN_DIGIT_WIDTH = 6  # narrowest ink a digit is squeezed to (a thin "1")
DIGIT_SPACING = 1  # least empty pixels between two digits' ink boxes, so that digits never touch
ROW_JITTER = 3  # most pixels a row digit moves up or down from the row's centre line
MAX_CANVAS_SIZE = 1024  # composites and their preview (4 times the area, in colour) are held in memory whole
MAX_AUGMENT_STRENGTH = 5.0  # the training script's bound; far larger strengths overflow the random scale factor
OVERFLOW_EXTRA = 2  # an overflow composite holds up to this many digits more than the model reads
ROW_DIGIT_ASPECT = 0.75  # a row digit's width, as a share of its height, that height_limit plans for
MAX_ASPECT_STRETCH = 4.0  # stretched crops are made before scatter and row cap their widths: this keeps them small


@dataclass
class Composite:
    image: np.ndarray  # (canvas, canvas) uint8, white on black
    label: str  # the digits in reading order, "" for a blank canvas
    layout: str  # one of COMPOSITE_LAYOUTS
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (x0, y0, x1, y1) per digit, label order
    sources: list[int] = field(default_factory=list)  # index of each digit in the MNIST split, label order


def scatter_capacity(canvas_size: int, min_center_gap: int, digit_size: int) -> int:
    """How many digits of up to digit_size x digit_size the scatter layout can always place (its
    fallback, when random placement fails): each digit centred in a cell of that size, in one row
    or in two staggered rows, cells at least DIGIT_SPACING apart and their centres at least
    min_center_gap + 1 apart (centring a digit in its cell rounds by up to half a pixel)."""
    if canvas_size < digit_size:
        return 0
    free, cell = canvas_size - digit_size, digit_size + DIGIT_SPACING
    one_row = free // max(min_center_gap + 1, cell) + 1
    two_rows = (
        free // max(min_center_gap + 1, math.ceil(cell / 2)) + 1 if canvas_size >= 2 * digit_size + DIGIT_SPACING else 0
    )
    return max(one_row, two_rows)


def row_width_budget(canvas_size: int, row_height: int, tilted: bool) -> int:
    """The widest row (digits and gaps) that stays a pixel clear of every edge; row_height
    includes the vertical jitter. A tilted row is budgeted by its diagonal, which bounds both its
    width and its height at any angle."""
    if not tilted:
        return canvas_size - 2
    room = canvas_size - 6  # two more pixels each side for the rounding of rotated digits
    return int(math.sqrt(max(0, room**2 - row_height**2)))


def row_capacity(canvas_size: int, digit_size: int, tilted: bool = False) -> int:
    """How many digits a row fits at the narrowest, each MIN_DIGIT_WIDTH wide with 1 px gaps."""
    budget = row_width_budget(canvas_size, digit_size + 2 * ROW_JITTER + 1, tilted)
    return max(0, (budget + 1) // (MIN_DIGIT_WIDTH + 1))


def random_offset(rng: np.random.Generator, span: int, margin: int, hug_borders: bool) -> int:
    """A position in [margin, span - margin]; with hug_borders, two times in three 0 or span,
    so that whatever is placed touches an edge of the canvas."""
    if hug_borders and rng.random() < 2 / 3:
        return span * int(rng.integers(0, 2))
    return int(rng.integers(margin, span - margin + 1))


def compose_scatter(
    crops: list[np.ndarray],
    rng: np.random.Generator,
    canvas_size: int,
    min_center_gap: int,
    digit_height: tuple[int, int],
    *,
    hug_borders: bool = False,
    max_tries: int = 200,
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int]]:
    """Scale each ink crop to a random height within digit_height and place it at random: ink
    boxes neither overlap nor touch, and centres are at least min_center_gap apart horizontally.
    Returns the canvas, the ink boxes in reading order and, for each box, which crop it holds.
    hug_borders pushes digits against the edges and into the corners (the anywhere stress set)."""
    low, high = digit_height
    sizes = []  # (height, width) per crop
    for crop in crops:
        h = int(rng.integers(low, high + 1))
        w = crop.shape[1] * h / crop.shape[0]
        if w > high:  # a wide digit is written smaller, to fit the square that scatter_capacity counts on
            h, w = max(low, round(h * high / w)), high
        sizes.append((h, min(high, max(MIN_DIGIT_WIDTH, round(w)))))
    n, space = len(crops), DIGIT_SPACING
    corners: list[tuple[int, int]] = []
    for _ in range(max_tries):
        corners = []
        for h, w in sizes:
            for _ in range(max_tries):
                x = random_offset(rng, canvas_size - w, 0, hug_borders)
                y = random_offset(rng, canvas_size - h, 0, hug_borders)
                clear = all(
                    abs(2 * x + w - 2 * px - pw) >= 2 * min_center_gap
                    and (x + w + space <= px or px + pw + space <= x or y + h + space <= py or py + ph + space <= y)
                    for (px, py), (ph, pw) in zip(corners, sizes)
                )
                if clear:
                    corners.append((x, y))
                    break
            else:
                break
        if len(corners) == n:
            break
    else:
        corners = fallback_corners(sizes, rng, canvas_size, min_center_gap, high)
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    for crop, (h, w), (x, y) in zip(crops, sizes, corners):
        np.maximum(canvas[y : y + h, x : x + w], augment.resize(crop, h, w), out=canvas[y : y + h, x : x + w])
    order = sorted(range(n), key=lambda i: 2 * corners[i][0] + sizes[i][1])  # by centre
    boxes = [(corners[i][0], corners[i][1], corners[i][0] + sizes[i][1], corners[i][1] + sizes[i][0]) for i in order]
    return canvas, boxes, order


def fallback_corners(
    sizes: list[tuple[int, int]], rng: np.random.Generator, canvas_size: int, min_center_gap: int, high: int
) -> list[tuple[int, int]]:
    """Top-left corners for digits of the given (height, width) sizes when random placement fails
    (crowded canvases can defeat rejection sampling): cells of the largest digit size in one row,
    or in two staggered rows where same-row neighbours are two pitches apart (always feasible
    within scatter_capacity), at a random offset. Each digit is centred across its cell, so
    centres keep the pitch, less half a pixel of rounding."""
    n = len(sizes)
    free, cell = canvas_size - high, high + DIGIT_SPACING
    pitch = max(min_center_gap + 1, cell)
    if (n - 1) * pitch <= free:
        top = int(rng.integers(0, free + 1))
        rows = [top, top]
    else:
        pitch = max(min_center_gap + 1, math.ceil(cell / 2))
        top = int(rng.integers(0, free - cell + 1))
        rows = [top, top + cell]
    x0 = int(rng.integers(0, free - (n - 1) * pitch + 1))
    return [
        (x0 + i * pitch + (high - w) // 2, rows[i % 2] + int(rng.integers(0, high - h + 1)))
        for i, (h, w) in enumerate(sizes)
    ]


def tilt_row(
    patches: list[np.ndarray], corners: list[tuple[int, int]], angle: float
) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Rotate a row of digit patches (top-left corners given) by angle degrees, counter-clockwise,
    about the row's centre: each patch turns about its own centre, which moves on a circle about
    the row's. Returns the turned patches cut to their nonzero pixels, and their new corners."""
    cx = (min(x for x, _ in corners) + max(x + p.shape[1] for p, (x, _) in zip(patches, corners))) / 2
    cy = (min(y for _, y in corners) + max(y + p.shape[0] for p, (_, y) in zip(patches, corners))) / 2
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    turned_patches, turned_corners = [], []
    for patch, (x, y) in zip(patches, corners):
        dx, dy = x + patch.shape[1] / 2 - cx, y + patch.shape[0] / 2 - cy
        turned = np.asarray(Image.fromarray(patch).rotate(angle, resample=Image.Resampling.BILINEAR, expand=True))
        x0, y0, x1, y1 = augment.ink_box(turned, threshold=0) or (0, 0, *turned.shape[::-1])  # no ink: the whole patch
        # Counter-clockwise on screen, where y points down.
        new_x, new_y = cx + dx * cos + dy * sin - turned.shape[1] / 2, cy - dx * sin + dy * cos - turned.shape[0] / 2
        turned_patches.append(turned[y0:y1, x0:x1])
        turned_corners.append((round(new_x) + x0, round(new_y) + y0))
    return turned_patches, turned_corners


def compose_row(
    crops: list[np.ndarray],
    rng: np.random.Generator,
    canvas_size: int,
    digit_height: tuple[int, int],
    *,
    tilt: float = 0.0,
    hug_borders: bool = False,
    touching: bool = False,
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Write the ink crops left to right like a handwritten number, all about one height within
    digit_height; returns the canvas and the ink box of each digit. The number stays a pixel clear
    of every edge, unless hug_borders lets it touch them; tilt rotates it by up to that many
    degrees (both for the anywhere stress set); touching writes neighbours' ink boxes 0-3 px into
    each other, so that strokes may meet."""
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    if not crops:
        return canvas, []
    low, high = digit_height
    height = rng.uniform(low, high)
    heights = [round(min(high, max(low, height * rng.uniform(0.9, 1.1)))) for _ in crops]
    widths = [max(MIN_DIGIT_WIDTH, crop.shape[1] * h / crop.shape[0]) for crop, h in zip(crops, heights)]
    gaps = rng.uniform(-3, 0, size=len(crops) - 1) if touching else rng.uniform(1, 6, size=len(crops) - 1)
    angle = rng.uniform(-tilt, tilt) if tilt else 0.0
    # A number too wide for the canvas (only with many or tall digits) is written narrower, keeping
    # its height. Rounding and the minimum widths can overshoot by a pixel or two, which the widest
    # digits (or gaps, once every digit is at its narrowest) give back.
    budget = row_width_budget(canvas_size, max(heights) + 2 * ROW_JITTER + 1, tilted=bool(tilt))
    squeeze = min(1.0, budget / (sum(widths) + gaps.sum()))
    widths = [max(MIN_DIGIT_WIDTH, round(w * squeeze)) for w in widths]
    spaces = [round(g * squeeze) if touching else max(1, round(g * squeeze)) for g in gaps]
    while sum(widths) + sum(spaces) > budget:
        shrinking = widths if max(widths) > MIN_DIGIT_WIDTH or touching else spaces
        shrinking[int(np.argmax(shrinking))] -= 1
    patches, corners, x = [], [], 0
    for crop, h, w, space in zip(crops, heights, widths, [*spaces, 0]):
        patches.append(augment.resize(crop, h, w))
        corners.append((x, round(-h / 2 + rng.uniform(-ROW_JITTER, ROW_JITTER))))  # about a centre line at y = 0
        x += w + space
    if angle:
        patches, corners = tilt_row(patches, corners, angle)
    # Place the number's bounding box on the canvas.
    x0, y0 = min(x for x, _ in corners), min(y for _, y in corners)
    x1 = max(x + p.shape[1] for p, (x, _) in zip(patches, corners))
    y1 = max(y + p.shape[0] for p, (_, y) in zip(patches, corners))
    margin = 0 if hug_borders else 1
    left = random_offset(rng, canvas_size - (x1 - x0), margin, hug_borders) - x0
    top = random_offset(rng, canvas_size - (y1 - y0), margin, hug_borders) - y0
    boxes = []
    for patch, (x, y) in zip(patches, corners):
        (h, w), x, y = patch.shape, x + left, y + top
        np.maximum(canvas[y : y + h, x : x + w], patch, out=canvas[y : y + h, x : x + w])
        boxes.append((x, y, x + w, y + h))
    return canvas, boxes


def parse_weights(text: str) -> list[float]:
    """Parse "1,3,5,7,9" into [1.0, 3.0, 5.0, 7.0, 9.0], for argparse."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,3,5,7,9, got {text!r}") from None


def option(default: Any, help: str = "", flag: str | None = None, **argparse_options: Any) -> Any:
    """A composer setting: its default and what it does, and, with flag ("main" or "wider", the
    group), the command-line flag add_composer_arguments makes of it (argparse_options as
    add_argument takes them, where its type alone would not do)."""
    return field(default=default, metadata={"help": help, "flag": flag, "argparse": argparse_options})


@dataclass(kw_only=True)
class ComposerSettings:
    """Everything that shapes the composites, each setting declared once: MultiDigitComposer takes
    them as keyword arguments, settings() gives them back, and the flags of this command and of
    split_multidigit_dataset.py are made from them; the stress options have none (`--stress` sets them)."""

    canvas_size: int = option(96, flag="main")
    min_digits: int = option(0, flag="main")
    max_digits: int = option(4, flag="main")
    length_weights: list[float] | None = option(
        None,
        "relative frequencies of 0, 1, ..., max-digits digits (default: min to max digits equally often)",
        "main",
        type=parse_weights,
        metavar="W0,W1,...",
    )
    layout: str = option("mixed", "", "main", choices=LAYOUTS)
    augment_strength: float = option(1.0, "0 turns per-digit augmentation off", "main")
    min_center_gap: int = option(12, "scatter: least horizontal distance between digit centres", "main")
    digit_height: tuple[int, int] = option(
        DIGIT_HEIGHT_RANGE,
        "range of digit ink heights in pixels, both layouts (default: %(default)s)",
        "main",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
    )
    stroke_width_change: int | None = option(
        None, "stress: every stroke grows (> 0) or shrinks (< 0) by exactly this many pixels, not at random"
    )
    aspect_stretch: tuple[float, float] = option((1.0, 1.0), "stress: each digit's width times a factor in this range")
    hug_borders: bool = option(False, "stress: digits pushed against the canvas edges")
    row_tilt: float = option(0.0, "rows tilted by up to this many degrees", "wider")
    scan_degradation: bool = option(False, "stress: every composite degraded like a scan (degrade_like_a_scan)")
    thickest_stroke: int = option(1, "random stroke thickening of up to this many pixels", "wider")
    pen_share: float = option(
        0.0, "share of digits and marks redrawn with a round pen, as a drawing pad makes them", "wider"
    )
    paper_noise: float = option(
        0.0, "share of composites on imperfect paper: grey, ruled, speckled, dusty, scanned", "wider"
    )
    touching_share: float = option(0.0, "share of rows whose digits touch", "wider")
    nondigit_share: float = option(0.0, 'share of composites holding marks that are not digits (label "")', "wider")
    overflow_share: float = option(
        0.0, f"share of composites with too many digits: 1-{OVERFLOW_EXTRA} more than --max-digits", "wider"
    )
    elastic_share: float = option(
        0.0, "share of digits (and marks) bent by an elastic distortion (Simard et al., 2003)", "wider"
    )


class MultiDigitComposer:
    """Draws composites from a pool of MNIST digits, with the ComposerSettings given as keyword
    arguments; they are checked here, before any work. A canvas with more digits than fit at the
    top of digit_height draws them smaller (height_limit)."""

    # The files whose code draws the composites: a cache of composites (datasets.composites_key)
    # made by other code is not used.
    drawing_code = tuple(Path(module.__file__) for module in (sys.modules[__name__], augment, marks))

    def __init__(self, images: np.ndarray, labels: np.ndarray, **settings: Any):
        self.images, self.labels = images, labels
        chosen = ComposerSettings(**settings)  # a name that is no setting is a TypeError, as for any function
        for f in fields(chosen):  # read as the composer's own attributes: self.canvas_size, ...
            setattr(self, f.name, getattr(chosen, f.name))
        self.check()  # before any work
        self.length_weights = None if self.length_weights is None else [float(w) for w in self.length_weights]
        self.digit_height = (int(self.digit_height[0]), int(self.digit_height[1]))
        self.aspect_stretch = (float(self.aspect_stretch[0]), float(self.aspect_stretch[1]))

    def check(self) -> None:
        """Raise ValueError for a pool or settings that cannot make composites."""
        if self.images.ndim != 3 or self.images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or self.images.dtype != np.uint8:
            raise ValueError(f"expected MNIST digits as (N, 28, 28) uint8, got {self.images.shape} {self.images.dtype}")
        if len(self.images) != len(self.labels) or len(self.images) == 0:
            raise ValueError(
                f"need a non-empty pool with one label per digit, got {len(self.images)} images "
                f"and {len(self.labels)} labels"
            )
        if not DIGIT_SIZE <= self.canvas_size <= MAX_CANVAS_SIZE:
            raise ValueError(f"canvas_size must be {DIGIT_SIZE} to {MAX_CANVAS_SIZE} pixels, got {self.canvas_size}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not 0 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 0 <= min_digits <= max_digits, got {self.min_digits} and {self.max_digits}")
        weights, most = self.length_weights, self.max_digits
        if weights is not None:
            # Written so that NaN fails every comparison, and a finite sum keeps the frequencies finite.
            if len(weights) != most + 1 or not all(w >= 0 for w in weights) or not 0 < sum(weights) < math.inf:
                raise ValueError(
                    f"length_weights must be {most + 1} non-negative numbers (for 0 to {most} digits) "
                    f"with a positive, finite sum, got {list(weights)}"
                )
            if any(weights[: self.min_digits]):
                raise ValueError(
                    f"length_weights {list(weights)} give weight to fewer than min_digits {self.min_digits} digits"
                )
        if self.min_center_gap < 1:
            raise ValueError(f"min_center_gap must be at least 1 pixel, got {self.min_center_gap}")
        if not 0 <= self.augment_strength <= MAX_AUGMENT_STRENGTH:  # false for NaN too
            raise ValueError(f"augment_strength must be 0 to {MAX_AUGMENT_STRENGTH:g}, got {self.augment_strength}")
        heights, stretch = self.digit_height, self.aspect_stretch
        tallest = self.canvas_size - 2 * ROW_JITTER - 3  # a row needs room for its jitter and a pixel margin
        if len(heights) != 2 or not MIN_DIGIT_WIDTH <= heights[0] <= heights[1] <= tallest:
            raise ValueError(
                f"digit_height must be (min, max) pixels with {MIN_DIGIT_WIDTH} <= min <= max <= {tallest} "
                f"on a {self.canvas_size}x{self.canvas_size} canvas, got {tuple(heights)}"
            )
        if self.stroke_width_change is not None and not -3 <= self.stroke_width_change <= 3:
            raise ValueError(
                f"stroke_width_change must be None (random) or -3 to 3 pixels, got {self.stroke_width_change}"
            )
        if len(stretch) != 2 or not 0 < stretch[0] <= stretch[1] <= MAX_ASPECT_STRETCH:
            raise ValueError(
                f"aspect_stretch must be (min, max) factors with 0 < min <= max <= {MAX_ASPECT_STRETCH:g}, "
                f"got {tuple(stretch)}"
            )
        if not 0 <= self.row_tilt <= 20:  # steeper rows could swap the reading order of narrow digits
            raise ValueError(f"row_tilt must be 0 to 20 degrees, got {self.row_tilt}")
        if not 1 <= self.thickest_stroke <= 3:
            raise ValueError(f"thickest_stroke must be 1 to 3 pixels, got {self.thickest_stroke}")
        for name in ("pen_share", "paper_noise", "touching_share", "nondigit_share", "overflow_share", "elastic_share"):
            if not 0 <= getattr(self, name) <= 1:  # false for NaN too
                raise ValueError(f"{name} must be 0 to 1, got {getattr(self, name)}")
        if self.nondigit_share + self.overflow_share > 1:
            raise ValueError(
                f"nondigit_share {self.nondigit_share} and overflow_share {self.overflow_share} add up to more than 1"
            )
        self.check_capacity()

    @property
    def most_digits(self) -> int:
        """The most digits a composite holds: max_digits, or more with overflow_share."""
        return self.max_digits + (OVERFLOW_EXTRA if self.overflow_share > 0 else 0)

    def height_limit(self, layout: str, n: int) -> int:
        """The tallest digit height, within digit_height, at which n digits always fit the layout:
        scatter's fallback placement must hold them, and a row must hold them at their natural
        widths (about ROW_DIGIT_ASPECT of their height). Never below digit_height's minimum,
        which check_capacity makes sure holds n digits."""
        low, high = self.digit_height
        for height in range(high, low, -1):
            if layout == "scatter" and scatter_capacity(self.canvas_size, self.min_center_gap, height) >= n:
                return height
            budget = row_width_budget(self.canvas_size, height + 2 * ROW_JITTER + 1, tilted=self.row_tilt > 0)
            if layout == "row" and n * ROW_DIGIT_ASPECT * height + 3 * (n - 1) <= budget:
                return height
        return low

    def check_capacity(self) -> None:
        """Raise ValueError if the most digits, at the smallest size, cannot always be placed."""
        most, low = self.most_digits, self.digit_height[0]
        fits = {
            "scatter": scatter_capacity(self.canvas_size, self.min_center_gap, low),
            "row": row_capacity(self.canvas_size, low, tilted=self.row_tilt > 0),
        }
        for name in ("scatter", "row") if self.layout == "mixed" else (self.layout,):
            if most > fits[name]:
                raise ValueError(
                    f"{most} digits do not fit on a {self.canvas_size}x{self.canvas_size} canvas "
                    f"in the {name} layout "
                    f"(at most {fits[name]} with digits {low} px high"
                    + (f" and a minimum centre gap of {self.min_center_gap} px" if name == "scatter" else "")
                    + "): lower --max-digits or --digit-height, or raise --canvas-size"
                )

    def prepare_digit(self, digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The digit augmented (perhaps bent, perhaps redrawn with a pen), cut to its ink and, with
        aspect_stretch, stretched sideways."""
        digit = augment.augment_digit(
            digit, rng, self.augment_strength, stroke=self.stroke_width_change, thickest=self.thickest_stroke
        )
        if self.elastic_share and rng.random() < self.elastic_share:
            digit = augment.elastic_distort(digit, rng)
        if self.pen_share and rng.random() < self.pen_share:
            redrawn = augment.redraw_with_pen(digit, radius=int(rng.integers(1, 5)))
            if augment.ink_box(redrawn) is not None:  # a faint digit can vanish when thinned: it keeps its own strokes
                digit = redrawn
        crop = augment.crop_to_ink(digit)
        if self.aspect_stretch != (1.0, 1.0):
            crop = augment.resize(crop, crop.shape[0], max(1, round(crop.shape[1] * rng.uniform(*self.aspect_stretch))))
        return crop

    def compose(self, rng: np.random.Generator) -> Composite:
        # Each option draws from rng only when it is on, so that turning one on changes no composite
        # of the settings without it.
        kind = rng.random() if self.nondigit_share or self.overflow_share else 1.0
        if kind < self.nondigit_share:
            composite = Composite(marks.draw_marks(rng, self.canvas_size, self.prepare_digit), label="", layout="marks")
        else:
            composite = self.compose_digits(rng, overflow=kind < self.nondigit_share + self.overflow_share)
        if self.paper_noise and rng.random() < self.paper_noise:
            composite.image = augment.add_paper_noise(composite.image, rng)
        if self.scan_degradation:
            composite.image = augment.degrade_like_a_scan(composite.image, rng)
        return composite

    def compose_digits(self, rng: np.random.Generator, overflow: bool) -> Composite:
        if overflow:
            n = self.max_digits + int(rng.integers(1, OVERFLOW_EXTRA + 1))
        elif self.length_weights is None:
            n = int(rng.integers(self.min_digits, self.max_digits + 1))
        else:
            n = int(rng.choice(self.max_digits + 1, p=np.asarray(self.length_weights) / sum(self.length_weights)))
        layout = str(rng.choice(["scatter", "row"])) if self.layout == "mixed" else self.layout
        picks = [int(i) for i in rng.integers(0, len(self.images), size=n)]
        crops = [self.prepare_digit(self.images[i], rng) for i in picks]
        heights = (self.digit_height[0], self.height_limit(layout, n))
        if layout == "scatter":
            canvas, boxes, order = compose_scatter(
                crops, rng, self.canvas_size, self.min_center_gap, heights, hug_borders=self.hug_borders
            )
            picks = [picks[i] for i in order]
        else:
            touching = bool(self.touching_share) and rng.random() < self.touching_share
            canvas, boxes = compose_row(
                crops,
                rng,
                self.canvas_size,
                heights,
                tilt=self.row_tilt,
                hug_borders=self.hug_borders,
                touching=touching,
            )
        return Composite(canvas, "".join(str(int(self.labels[i])) for i in picks), layout, boxes, picks)

    def settings(self) -> dict:
        """Everything that shapes the composites, JSON-ready: MultiDigitComposer(images, labels, **settings)
        rebuilds it."""
        chosen = {f.name: getattr(self, f.name) for f in fields(ComposerSettings)}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in chosen.items()}


def generate(
    composer: MultiDigitComposer,
    num_images: int,
    seed: int,
    *,
    pool_indices: np.ndarray | None = None,
    progress: bool = True,
) -> list[Composite]:
    """Image i is composed with default_rng([seed, i]). When the composer's digits are a subset
    of an MNIST split, pool_indices maps each pool position back to its MNIST index."""
    composites = [
        composer.compose(np.random.default_rng([seed, i]))
        for i in tqdm(range(num_images), desc="composing", unit="img", disable=not progress)
    ]
    if pool_indices is not None:
        for c in composites:
            c.sources = [int(pool_indices[i]) for i in c.sources]
    return composites


def check_composer_settings(**settings) -> None:
    """Raise ValueError for impossible composition settings, before any MNIST is loaded."""
    MultiDigitComposer(np.zeros((1, DIGIT_SIZE, DIGIT_SIZE), np.uint8), np.zeros(1), **settings)


def check_dataset_size(num_images: int, canvas_size: int, setting: str) -> None:
    """Raise ValueError, naming the setting, for more images than this machine's memory holds: a
    dataset is composed in memory, then stacked into one array to be written."""
    if "SC_PHYS_PAGES" not in getattr(os, "sysconf_names", {}):  # Windows: no memory size to compare with
        return
    need, have = 2 * num_images * canvas_size**2, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(
            f"{setting} {num_images}: composing that many {canvas_size}x{canvas_size} images needs about "
            f"{need / 2**30:.0f} GiB of memory, this machine has {have / 2**30:.0f} GiB; write smaller datasets"
        )


def add_composer_arguments(parser: argparse.ArgumentParser) -> None:
    """The composition flags shared by this command and split_multidigit_dataset.py: --mnist-root,
    and one for each ComposerSettings field that has a flag."""
    parser.add_argument(
        "--mnist-root",
        default=default_mnist_root(),
        help="folder holding MNIST/raw/ (default: $MNIST_ROOT or data); downloaded there if missing",
    )
    groups = {
        "main": parser,
        "wider": parser.add_argument_group("the wider world training draws from (off by default)"),
    }
    kinds = typing.get_type_hints(ComposerSettings)
    for f in fields(ComposerSettings):
        if f.metadata["flag"]:
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            options = {"type": kinds[f.name], "default": default, "help": f.metadata["help"] or None}
            groups[f.metadata["flag"]].add_argument("--" + f.name.replace("_", "-"), **options | f.metadata["argparse"])


def composer_settings(args: argparse.Namespace) -> dict:
    """The ComposerSettings that add_composer_arguments made flags of, as the command line gave them."""
    return {f.name: getattr(args, f.name) for f in fields(ComposerSettings) if f.metadata["flag"]}


def main(argv: list[str] | None = None) -> int:
    parser = CommandLine(__doc__)
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument(
        "--split", choices=("train", "test"), default="train", help="which MNIST split the digits come from"
    )
    parser.add_argument(
        "--digit-indices", help="JSON file with a list of MNIST indices to draw from (default: the whole split)"
    )
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    add_composer_arguments(parser)
    args = parser.parse_args(argv)
    if args.num_images < 0:
        parser.error(f"--num-images must be >= 0, got {args.num_images}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        check_composer_settings(**composer_settings(args))
        check_dataset_size(args.num_images, args.canvas_size, "--num-images")
        check_destination(args.out, DATASET_FILES)
        indices = read_digit_indices(args.digit_indices, args.split) if args.digit_indices else None
        images, labels = load_mnist(args.mnist_root, train=args.split == "train")
        if indices is None:
            indices = np.arange(len(images))
        composer = MultiDigitComposer(images[indices], labels[indices], **composer_settings(args))
    except (ValueError, OSError, MnistUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    composites = generate(composer, args.num_images, args.seed, pool_indices=indices)
    meta = dict(composer.settings(), seed=args.seed, mnist_split=args.split, digit_indices=args.digit_indices)
    try:
        folder = write_dataset(args.out, composites, meta)
    except OSError as error:  # a full disk, a read-only folder, ...: write_dataset leaves nothing behind
        print(f"error: writing {args.out} failed ({error}); nothing was written there", file=sys.stderr)
        return 1
    print(f"wrote {len(composites)} images to {folder} (preview: {folder / 'preview.png'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
