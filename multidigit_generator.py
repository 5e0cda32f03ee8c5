"""Compose MNIST digits into multi-digit images, as a library and as a command.

Two layouts, both white digits on a black canvas (96x96 by default), 0-4 digits each:
  scatter  digits dropped at random, their ink boxes never overlapping or touching; the label
           reads them left to right by centre, and placements whose centres are horizontally
           closer than --min-center-gap are redrawn so that order is never ambiguous.
  row      a number written left to right, all digits about one height, with random gaps
           and a little vertical jitter.
Every digit is augmented first (small rotation, shear, scale; thinner or thicker strokes),
then cropped to its ink and scaled to an ink height within --digit-height (18-28 px by
default) in both layouts, so that nothing the model sees keeps MNIST's own normalisation
(every digit in a 20x20 box, centred by mass).

Stress options (used by split_multidigit_dataset.py --stress, off by default) change the
strokes, the digit proportions or the placement, or degrade the image like a scan. The wider
world training draws from (also off by default, so that evaluation sets hold digits as
written) redraws digits with a round pen, lays composites on imperfect paper, writes touching
rows, composes marks that are not digits (label "") and more digits than the model reads.

to_canvas, at the end, turns any image into the model's canvas: the one transform with which
predict.py, the front end and evaluate.py --as-files read images.

All randomness comes from one seed: image i of a dataset is drawn with
numpy.random.default_rng([seed, i]), so the same seed gives the same bytes whatever the
order or the number of processes. Training uses the same composer to draw fresh
composites every epoch (FreshComposites), so it never sees the same composite twice, or
reads the very same composites from epochs composed ahead into a cache (CachedComposites).

    uv run python multidigit_generator.py --split test --num-images 1000 --out data/demo
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import reprlib
import shutil
import signal
import string
import struct
import sys
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageDraw, ImageFont, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

# Composing needs only PIL and torch: torchvision, whose import takes seconds (it pulls in
# torch._dynamo) in every process that composes, is imported only to download MNIST.
DIGIT_SIZE = 28  # MNIST digits are 28x28
LAYOUTS = ("scatter", "row", "mixed")
COMPOSITE_LAYOUTS = ("scatter", "row", "marks")  # what a composite is: "marks" holds no digits, only other marks
DATASET_FILES = ("images.npy", "labels.json", "metadata.json", "preview.png")  # a dataset folder, as written
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DIGIT_HEIGHT_RANGE = (18, 28)  # default ink height of a composed digit, in pixels
MIN_DIGIT_WIDTH = 6  # narrowest ink a digit is squeezed to (a thin "1")
DIGIT_SPACING = 1  # least empty pixels between two digits' ink boxes, so that digits never touch
ROW_JITTER = 3  # most pixels a row digit moves up or down from the row's centre line
MNIST_COUNTS = {"train": 60_000, "test": 10_000}  # digits in each MNIST split
IDX_MAGIC = {"images": 2051, "labels": 2049}  # idx headers: unsigned bytes in 3 and in 1 dimensions
MAX_CANVAS_SIZE = 1024  # composites and their preview (4 times the area, in colour) are held in memory whole
MAX_AUGMENT_STRENGTH = 5.0  # the training script's bound; far larger strengths overflow the random scale factor
OVERFLOW_EXTRA = 2  # an overflow composite holds up to this many digits more than the model reads
ROW_DIGIT_ASPECT = 0.75  # a row digit's width, as a share of its height, that height_limit plans for
MAX_ASPECT_STRETCH = 4.0  # stretched crops are made before scatter and row cap their widths: this keeps them small
ELASTIC_ALPHA, ELASTIC_SIGMA = 34.0, 4.0  # Simard et al. (2003)'s elastic distortion of a 28x28 digit, in pixels


class CommandLine(argparse.ArgumentParser):
    """The scripts' argument parser: the script's docstring is its help, and a usage error is one
    line saying what is wrong (argparse would print its whole usage block first)."""

    def __init__(self, description: str | None):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


class MnistUnavailableError(RuntimeError):
    """MNIST is neither on disk nor downloadable, or its files on disk are not MNIST's."""


def default_mnist_root() -> str:
    return os.environ.get("MNIST_ROOT", "data")


def mnist_files(root: str | Path, *, train: bool) -> dict[str, Path]:
    """The raw images and labels files of one MNIST split under root, by kind."""
    raw, prefix = Path(root) / "MNIST" / "raw", "train" if train else "t10k"
    return {"images": raw / f"{prefix}-images-idx3-ubyte", "labels": raw / f"{prefix}-labels-idx1-ubyte"}


def idx_count(path: Path, kind: str) -> int:
    """How many images or labels (kind) an MNIST idx file holds, read from its header after
    checking that the header is one of that kind and that the file is as long as it says."""
    dims = 3 if kind == "images" else 1
    try:
        with open(path, "rb") as file:
            header = file.read(4 * (dims + 1))
        size = path.stat().st_size
    except OSError as error:
        raise MnistUnavailableError(f"{path} cannot be read ({error})") from error
    if len(header) < 4 * (dims + 1):
        raise MnistUnavailableError(f"{path} is too short for an MNIST {kind} file: restore the original file")
    magic, count, *shape = struct.unpack(f">{dims + 1}I", header)
    if magic != IDX_MAGIC[kind]:
        raise MnistUnavailableError(
            f"{path} is not an MNIST {kind} file (idx magic number {magic}, not {IDX_MAGIC[kind]}): "
            "restore the original file"
        )
    if shape and shape != [DIGIT_SIZE, DIGIT_SIZE]:
        raise MnistUnavailableError(
            f"{path} holds {shape[0]}x{shape[1]} images, MNIST's are {DIGIT_SIZE}x{DIGIT_SIZE}: "
            "restore the original file"
        )
    if size != len(header) + count * math.prod(shape):
        raise MnistUnavailableError(
            f"{path} is {size} bytes, its header promises {len(header) + count * math.prod(shape)}: "
            "the file is cut short or damaged; restore the original file"
        )
    return count


def check_mnist_files(root: str | Path, *, train: bool) -> None:
    """Raise MnistUnavailableError naming the file unless the raw files of one split are MNIST's:
    idx files of the right kinds, and both holding that split's number of digits."""
    split = "train" if train else "test"
    files = mnist_files(root, train=train)
    counts = {kind: idx_count(path, kind) for kind, path in files.items()}
    for kind, other in (("images", "labels"), ("labels", "images")):
        if counts[kind] != MNIST_COUNTS[split]:
            found = (
                f"the {split} {other} {counts[other]}"
                if counts[other] == MNIST_COUNTS[split]
                else f"MNIST's {split} split has {MNIST_COUNTS[split]}"
            )
            raise MnistUnavailableError(
                f"{files[kind]} holds {counts[kind]} {kind}, {found}: the files are from different MNIST splits; "
                "restore the original files"
            )


def load_mnist(root: str | Path, *, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images (N, 28, 28) uint8 and labels (N,) int64 from root/MNIST/raw.

    Files that are missing are downloaded first (by torchvision, which also extracts .gz copies
    found there). Files that are not one MNIST split (a file of the other split, a labels file
    in the place of an images file, a cut-short file) are refused, naming the file, rather than
    giving digits wrong labels."""
    files = mnist_files(root, train=train)
    if not all(path.is_file() for path in files.values()):
        download_mnist(root, train=train)
    check_mnist_files(root, train=train)
    images = np.fromfile(files["images"], dtype=np.uint8, offset=16).reshape(-1, DIGIT_SIZE, DIGIT_SIZE)
    labels = np.fromfile(files["labels"], dtype=np.uint8, offset=8).astype(np.int64)
    if labels.max() > 9:
        raise MnistUnavailableError(
            f"{files['labels']} holds labels up to {labels.max()}, MNIST's are 0-9: restore the original file"
        )
    return images, labels


def download_mnist(root: str | Path, *, train: bool) -> None:
    import torchvision  # imported here: it is slow to import and only needed for downloading

    try:
        torchvision.datasets.MNIST(root=str(root), train=train, download=True)
    except Exception as error:  # no network, a refused mirror, a corrupt file, ...
        raw = Path(root) / "MNIST" / "raw"
        raise MnistUnavailableError(
            f"MNIST is not in {raw} and could not be downloaded ({type(error).__name__}: {error}).\n"
            f"Put the four MNIST files {', '.join(MNIST_FILES)} (or their .gz versions) in {raw}/, "
            "or point --mnist-root or the MNIST_ROOT environment variable at a folder that has "
            "MNIST/raw/ with them."
        ) from error


def augment_digit(
    digit: np.ndarray, rng: np.random.Generator, strength: float = 1.0, stroke: int | None = None, thickest: int = 1
) -> np.ndarray:
    """Small random rotation, shear and scale, then thinner or thicker strokes.

    strength scales every range (0 turns augmentation off); 1.0 gives rotations up to
    12 degrees, shears up to 10 degrees, scales 0.9-1.1 and a one-pixel stroke change on
    40 % of digits, where thinner strokes are blended with the original so that they fade
    instead of vanishing. stroke, when given, replaces that random change: every stroke
    grows (> 0) or shrinks (< 0) by exactly that many pixels (the stress sets), thinner
    strokes brightened back to the digit's brightest ink, as a thinner pen would draw them.
    thickest > 1 spreads the random thickening over 1 to thickest pixels."""
    if strength <= 0 and not stroke:
        return digit
    fade = stroke is None
    if strength > 0:
        angle, shear = rng.uniform(-12, 12) * strength, rng.uniform(-10, 10) * strength
        scale = math.exp(rng.uniform(-0.1, 0.1) * strength)
        if stroke is None:
            p_change = 0.2 * min(strength, 2.5)
            thicker = list(range(1, thickest + 1))
            stroke = int(
                rng.choice([-1, 0, *thicker], p=[p_change, 1 - 2 * p_change, *[p_change / len(thicker)] * len(thicker)])
            )
        # On a PIL image: three times faster than on a tensor, and training composes every digit afresh.
        digit = turn_and_shear(digit, angle=angle, shear=shear, scale=scale)
    if not stroke:
        return digit
    image = digit.astype(np.float32)
    changed = change_stroke_width(image, stroke)
    if stroke < 0 and fade:
        image = 0.5 * (image + changed)
    elif stroke < 0:
        image = changed * (image.max() / max(changed.max(), np.float32(1)))
    else:
        image = changed
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def turn_and_shear(image: np.ndarray, *, angle: float, shear: float, scale: float) -> np.ndarray:
    """The image rotated by angle degrees (counter-clockwise), sheared sideways by shear degrees
    and scaled, all about its centre, bilinearly; same size, black where nothing maps."""
    a, t = math.radians(angle), math.tan(math.radians(shear))
    # forward: scale, then shear (x += t * y), then rotate; PIL wants the inverse, output -> input
    forward = scale * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) @ np.array([[1, t], [0, 1]])
    inverse = np.linalg.inv(forward)
    cx, cy = image.shape[1] / 2, image.shape[0] / 2
    offset = np.array([cx, cy]) - inverse @ np.array([cx, cy])
    coefficients = (*inverse[0], offset[0], *inverse[1], offset[1])
    turned = Image.fromarray(image).transform(
        image.shape[::-1], Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR, fillcolor=0
    )
    return np.array(turned)  # writable, as every digit array here is


def elastic_distort(
    digit: np.ndarray, rng: np.random.Generator, *, alpha: float = ELASTIC_ALPHA, sigma: float = ELASTIC_SIGMA
) -> np.ndarray:
    """The digit bent as a hand varies its strokes (Simard et al., 2003): every pixel is moved by a
    random displacement field, uniform noise smoothed by a Gaussian of sigma pixels and scaled by
    alpha, so that neighbouring pixels move together and strokes bend rather than break."""
    height, width = digit.shape
    noise = torch.from_numpy(rng.uniform(-1, 1, size=(2, 1, height, width)).astype(np.float32))
    dx, dy = (gaussian_blur(channel, sigma) * alpha for channel in noise)
    # grid_sample reads the source at normalised (x, y) in [-1, 1]: a pixel's shift is 2 / size there.
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    grid = torch.stack([xs + dx[0] * 2 / width, ys + dy[0] * 2 / height], dim=-1)[None]
    source = torch.from_numpy(digit).float()[None, None]
    bent = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return bent[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """A (1, H, W) float image blurred with a Gaussian of that sigma (a kernel of kernel_size,
    by default reaching 3 sigma), edges reflected."""
    radius = (kernel_size // 2) if kernel_size else math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))[0]


def change_stroke_width(image: np.ndarray, pixels: int) -> np.ndarray:
    """Grey-level dilation (pixels > 0) or erosion (pixels < 0) of a float image with a
    (|pixels| + 1)-square window: strokes grow or shrink by |pixels| pixels across."""
    k, (height, width) = abs(pixels), image.shape
    extreme = np.maximum if pixels > 0 else np.minimum
    # Beyond the border lies paper (dilation) or ink (erosion), so the border changes nothing. An
    # even window cannot be centred: odd changes grow right and down.
    padded = np.full((height + k, width + k), 0 if pixels > 0 else 255, dtype=image.dtype)
    padded[k // 2 : k // 2 + height, k // 2 : k // 2 + width] = image
    rows = functools.reduce(extreme, (padded[:, i : i + width] for i in range(k + 1)))
    return functools.reduce(extreme, (rows[i : i + height] for i in range(k + 1)))


def ink_box(image: np.ndarray, threshold: int = 32) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), exclusive ends, of the pixels brighter than threshold; None if none."""
    ys, xs = np.nonzero(image > threshold)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def crop_to_ink(digit: np.ndarray) -> np.ndarray:
    """The digit cut to its ink box (all of it if it has no ink)."""
    box = ink_box(digit)
    return digit if box is None else digit[box[1] : box[3], box[0] : box[2]]


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 image resized bilinearly, averaging over the pixels it shrinks (antialiased)."""
    x = torch.from_numpy(image)[None, None].float()
    out = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def degrade_like_a_scan(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A composite as a poor scan would give it: Gaussian blur (sigma 0.5-1.2), lower contrast
    (ink 120-255 on a background of 0-60, at least 100 apart), additive Gaussian noise (sigma
    2-8) and JPEG compression at quality 30-70. Still light digits on a dark background, uint8."""
    sigma = rng.uniform(0.5, 1.2)
    blurred = gaussian_blur(torch.from_numpy(image)[None].float(), sigma)
    background = rng.uniform(0, 60)
    # Less contrast than 100 levels makes blurred thin digits unreadable.
    ink = rng.uniform(max(120, background + 100), 255)
    scanned = (
        background + blurred[0].numpy() * ((ink - background) / 255) + rng.normal(0, rng.uniform(2, 8), image.shape)
    )
    jpeg = io.BytesIO()
    Image.fromarray(np.clip(scanned.round(), 0, 255).astype(np.uint8)).save(
        jpeg, format="JPEG", quality=int(rng.integers(30, 71))
    )
    return np.array(Image.open(jpeg))


def redraw_with_pen(digit: np.ndarray, radius: int) -> np.ndarray:
    """The digit as a drawing pad would make it: its strokes thinned to their centre lines, then
    drawn again with a round pen of the given radius (1-4, in half pixels of the 28x28 digit) at
    full brightness. Works at twice the resolution, so that thin pens stay smooth."""
    x = F.pad(torch.from_numpy(digit).float()[None, None] / 255, (2, 2, 2, 2))
    ink = (F.interpolate(x, scale_factor=2, mode="bilinear") > 0.45)[0, 0].numpy()
    drawn = draw_with_round_pen(morphological_skeleton(ink), radius)
    # Each output pixel is the share of its 2x2 block the pen covered.
    height, width = drawn.shape
    covered = drawn.reshape(height // 2, 2, width // 2, 2).sum(axis=(1, 3), dtype=np.float32)
    return np.round(covered / 4 * 255).astype(np.uint8)


# Binary morphology on boolean arrays, by shifted copies: on images this small a numpy operation
# costs a fraction of a torch convolution or pooling call, and training redraws many of its
# digits (docs/performance.md has the composing times).


def erode_3x3(mask: np.ndarray) -> np.ndarray:
    """A boolean image eroded by a 3x3 square; beyond the border lies paper."""
    rows = mask[:, :-2] & mask[:, 1:-1] & mask[:, 2:]
    eroded = np.zeros_like(mask)
    eroded[1:-1, 1:-1] = rows[:-2] & rows[1:-1] & rows[2:]
    return eroded


def widen(mask: np.ndarray) -> np.ndarray:
    """A boolean image with every ink pixel spread one pixel left and right, within its borders."""
    wider = mask.copy()
    wider[:, 1:] |= mask[:, :-1]
    wider[:, :-1] |= mask[:, 1:]
    return wider


def dilate_3x3(mask: np.ndarray) -> np.ndarray:
    """A boolean image dilated by a 3x3 square; beyond the border lies paper."""
    return widen(widen(mask).T).T


def morphological_skeleton(ink: np.ndarray) -> np.ndarray:
    """Centre lines of a boolean image: the union, over repeated 3x3 erosions, of what an opening
    removes (Lantuejoul's skeleton). It can leave one-pixel gaps, which any pen closes."""
    skeleton, eroded = np.zeros_like(ink), ink
    while eroded.any():
        smaller = erode_3x3(eroded)
        skeleton |= eroded & ~dilate_3x3(smaller)
        eroded = smaller
    return skeleton


def draw_with_round_pen(lines: np.ndarray, radius: int) -> np.ndarray:
    """Every pixel within the round pen (x^2 + y^2 <= radius^2 + radius) of a line pixel, within the
    borders: the lines widened sideways by each of the pen's half-widths, then laid over each other
    at the heights of the pen's rows."""
    height = lines.shape[0]
    widened = [lines]  # widened[k]: the lines spread k pixels left and right
    for _ in range(radius):
        widened.append(widen(widened[-1]))
    drawn = np.zeros_like(lines)
    for dy in range(-radius, radius + 1):
        half_width = math.isqrt(radius * radius + radius - dy * dy)
        drawn[max(0, -dy) : height - max(0, dy)] |= widened[half_width][max(0, dy) : height + min(0, dy)]
    return drawn


def add_paper_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The composite on imperfect paper, each defect with its own chance: grey paper, ruled lines,
    speckles, dust, and then, half the time, a poor scan (degrade_like_a_scan). White ink on
    black, uint8, like every canvas."""
    size = image.shape[0]
    paper = np.zeros(image.shape, np.float32)
    if rng.random() < 0.5:  # grey paper, a little uneven
        ramp = np.linspace(0, 1, size, dtype=np.float32)
        paper += rng.uniform(5, 45) + rng.uniform(-10, 10) * (ramp[None, :] if rng.random() < 0.5 else ramp[:, None])
    if rng.random() < 0.3:  # ruled lines, one pixel, faint, nearly level
        pitch, slope = int(rng.integers(14, 33)), rng.uniform(-0.03, 0.03)
        xs = np.arange(size)
        for y0 in range(int(rng.integers(0, pitch)), size, pitch):
            ys = np.clip(np.round(y0 + slope * xs).astype(int), 0, size - 1)
            paper[ys, xs] = np.maximum(paper[ys, xs], rng.uniform(30, 90))
    if rng.random() < 0.6:  # speckles: single pixels
        count = int(rng.integers(3, 60))
        ys, xs = rng.integers(0, size, count), rng.integers(0, size, count)
        paper[ys, xs] = np.maximum(paper[ys, xs], rng.uniform(40, 230, count))
    if rng.random() < 0.3:  # dust: a few specks of two or three pixels across
        for _ in range(int(rng.integers(1, 5))):
            y, x, r = int(rng.integers(0, size - 3)), int(rng.integers(0, size - 3)), int(rng.integers(2, 4))
            paper[y : y + r, x : x + r] = np.maximum(paper[y : y + r, x : x + r], rng.uniform(60, 200))
    noisy = np.clip(np.maximum(paper, image.astype(np.float32)), 0, 255).round().astype(np.uint8)
    return degrade_like_a_scan(noisy, rng) if rng.random() < 0.5 else noisy


# Marks that are not digits, for the model to learn to read as nothing. No plain rings (a "0"),
# vertical strokes (a "1"), letters that pass for digits (O, l, S, Z, B, g, q, ...), or shapes of
# two or three strokes (a "7", a "4").
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
    """One mark of a random kind (MARK_KINDS) drawn as MNIST drew its digits: in a box of a 28x28
    cell, its longer side 20 px and never upright and narrow, with a pen 1-3 px wide, drawn four
    times larger and area-averaged down, then slightly blurred, so that its strokes have a digit's
    graded edges. A mark that came out as a 0 would (looks_like_a_zero) is drawn again.
    The composer then treats it exactly like a digit (augmented, perhaps redrawn with a pen),
    so that the way a stroke is drawn never tells a mark from a digit."""
    while looks_like_a_zero(cell := draw_one_mark_cell(rng)):
        pass
    return cell


def draw_one_mark_cell(rng: np.random.Generator) -> np.ndarray:
    """draw_mark_cell's mark, before it is checked."""
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
    digit (`prepare`: the composer's augmentation, pen and cut to ink) and scaled so that its
    20 px box becomes 10 to 60 px across. Marks may overlap; nothing in them is a digit."""
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


@dataclass
class Composite:
    image: np.ndarray  # (canvas, canvas) uint8, white on black
    label: str  # the digits in reading order, "" for a blank canvas
    layout: str  # one of COMPOSITE_LAYOUTS
    # (x0, y0, x1, y1) ink box per digit, in label order
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
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
                x, y = (
                    random_offset(rng, canvas_size - w, 0, hug_borders),
                    random_offset(rng, canvas_size - h, 0, hug_borders),
                )
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
        np.maximum(canvas[y : y + h, x : x + w], resize(crop, h, w), out=canvas[y : y + h, x : x + w])
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
        x0, y0, x1, y1 = ink_box(turned, threshold=0) or (0, 0, *turned.shape[::-1])  # an inkless patch stays whole
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
        patches.append(resize(crop, h, w))
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


# ---- any image as a canvas: the one transform predict.py, the front end and evaluate.py --as-files
# read images with, so that what is measured is what users get.

BLANK_INK_LEVEL = 48  # a canvas whose brightest pixel is dimmer than this has no ink
MIN_CONTRAST = 32  # ink must stand this far above the background to count as ink
# Ink larger than this (longer side) is shrunk to it before it is measured: a 96-pixel canvas
# needs no more detail, and measuring the ink costs time in proportion to the pixels.
WORKING_SIZE = 512
# A round dab of ink is as long as it is wide (1 stroke width). Digits are longer, though less
# than one might think: a small thick-stroked digit, whose blur fills its loops, comes close
# (docs/design.md has the ratios measured on the test and stress sets).
DOT_STROKES = 1.2
CANVAS_MARGIN = 2  # pixels kept clear around ink that had to be shrunk to fit the canvas
# Greyscale modes deeper than 8 bits: 16-bit (in either byte order), 32-bit integer, float.
DEEP_GREY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def eight_bit_grey(image: Image.Image) -> Image.Image:
    """A greyscale image deeper than 8 bits (DEEP_GREY_MODES) as 8-bit grey levels ("L"), its
    full range scaled to 0-255; Pillow's own conversion clips at 255 instead, which turns most
    16-bit paper and ink alike white.

    The 16-bit modes span 0-65535. "I" and "F" have no fixed range, so theirs is the narrowest
    that holds the brightest pixel: 0-255, 0-65535 (16-bit data stored wider), else 0 up to that
    pixel; for "F" first 0-1, the usual range of float images. Negative and non-finite values
    count as 0."""
    levels = np.array(image, dtype=np.float32)  # a writable copy, scaled in place
    np.nan_to_num(levels, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    top = float(levels.max())
    if image.mode.startswith("I;16"):
        full_range = 65535.0
    elif image.mode == "F" and top <= 1.0:
        full_range = 1.0
    else:
        full_range = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    levels *= 255.0 / full_range
    np.clip(levels, 0, 255, out=levels)
    return Image.fromarray(np.rint(levels, out=levels).astype(np.uint8))


def grey_and_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The image's 8-bit grey levels ("L") and its alpha ("L"), or None for alpha when every
    pixel is (nearly) opaque."""
    if image.mode in DEEP_GREY_MODES:
        return eight_bit_grey(image), None
    if image.mode in ("LA", "PA", "RGBA"):
        alpha = image.getchannel("A")
    elif "transparency" in image.info:  # a palette entry or a colour marked transparent
        alpha = image.convert("RGBA").getchannel("A")
    else:
        alpha = None
    if alpha is not None and alpha.getextrema()[0] >= 0.99 * 255:
        alpha = None
    # Pillow converts CIELab to RGB but not straight to grey; its L channel is the lightness.
    return image.getchannel("L") if image.mode == "LAB" else image.convert("L"), alpha


def ink_image(image: Image.Image) -> Image.Image:
    """Any image -> its ink ("L", the image's size): 0 for background, the strongest ink
    stretched to 255 (faint ink gets full contrast); all 0 if no ink stands MIN_CONTRAST above
    the background.

    Built from 8-bit planes and lookup tables from grey level to ink, never a float copy of the
    image: a photo of tens of megapixels must not take gigabytes."""
    grey, alpha = grey_and_alpha(image)
    if alpha is not None:
        # Transparent background (a drawing pad): ink is wherever it is opaque. Strokes may be
        # dark or light; which one decides whether their grey level or its inverse is the ink.
        # ImageChops.multiply is a * b / 255, so the sums below are of grey * alpha / 255 and of alpha.
        dark_strokes = 255 * histogram_sum(ImageChops.multiply(grey, alpha)) < 128 * histogram_sum(alpha)
        ink = ImageChops.multiply(alpha, ImageOps.invert(grey) if dark_strokes else grey)
        ink_of_level = np.arange(256.0)
    else:
        # Opaque: the border is mostly background, so its median tells paper from ink.
        width, height = grey.size
        edges = [(0, 0, width, 1), (0, height - 1, width, height), (0, 0, 1, height), (width - 1, 0, width, height)]
        border = np.concatenate([np.asarray(grey.crop(edge), dtype=np.float64).ravel() for edge in edges])
        paper = np.median(border)
        ink_of_level = np.arange(256.0)
        if paper > 127:  # dark ink on light paper
            ink_of_level, border, paper = 255.0 - ink_of_level, 255.0 - border, 255.0 - paper
        # Paper grain, sensor noise and JPEG ringing sit a few levels around the background; three
        # robust standard deviations of the border take them out. The model only ever saw exact
        # black around its strokes, and read leftover speckles as strings of digits.
        noise = 1.4826 * np.median(np.abs(border - paper))
        ink, ink_of_level = grey, ink_of_level - paper - 3 * noise
    darkest, brightest = ink.getextrema()
    top = max(ink_of_level[darkest], ink_of_level[brightest])  # monotonic: the strongest ink is at one end
    if top < MIN_CONTRAST:
        return Image.new("L", ink.size)
    return ink.point(np.rint(ink_of_level.clip(0, top) * (255.0 / top)).astype(np.uint8).tolist())


def histogram_sum(image: Image.Image) -> int:
    """The sum of an "L" image's pixel values, counted from its histogram (no copy of the pixels)."""
    return sum(level * count for level, count in enumerate(image.histogram()))


@dataclass
class InkMeasure:
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive ends
    digit_height: float
    stroke_width: float


def measure_ink(ink: np.ndarray) -> InkMeasure | None:
    """Where the ink is and how big its digits and strokes are; None if there is no ink.

    The digit height is the median height of the ink's connected pieces, counting only pieces
    at least a third as tall as the tallest: a digit drawn in one stroke is one piece, and the
    small bar of a 5 or a speck must not drag the median down."""
    from scipy import ndimage  # imported here: a slow import that only measuring needs

    mask = ink >= MIN_CONTRAST
    pieces, count = ndimage.label(mask)
    if count == 0:
        return None
    heights = np.array([s[0].stop - s[0].start for s in ndimage.find_objects(pieces)])
    box = ink_box(ink, threshold=MIN_CONTRAST - 1)  # the mask's pixels: brighter than MIN_CONTRAST - 1
    # Twice the largest distance from a pixel of ink to the nearest background: the widest stroke.
    stroke_width = 2.0 * float(ndimage.distance_transform_edt(mask).max())
    return InkMeasure(box, float(np.median(heights[heights * 3 >= heights.max()])), stroke_width)


def to_canvas(image: Image.Image, canvas_size: int, digit_height: tuple[int, int] = DIGIT_HEIGHT_RANGE) -> np.ndarray:
    """The model's view of an image: (canvas_size, canvas_size) uint8, white ink on black.

    Digits are brought to the size the model was trained on. When their height (see measure_ink)
    is outside digit_height (with 10 % slack), the ink is cropped and scaled, keeping its aspect
    ratio, to the middle of that range; otherwise it keeps its size. The result is centred on
    the canvas, and shrunk further only if it would not fit. An image that already is a canvas
    with digits of a trained size reaches the model unchanged. No ink at all, or only a dot
    (ink no longer than DOT_STROKES stroke widths: a tap on a drawing pad, a speck), gives an empty canvas."""
    empty = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    ink = ink_image(image)
    if max(ink.size) > canvas_size:
        # Ink that does not fit the canvas is cropped to its box below anyway. Cropping here, at
        # full resolution, before anything is shrunk, keeps the detail of small digits in a large
        # image: a number written small along a long strip must not shrink with the whole strip.
        box = ink.point(lambda level: 255 if level >= MIN_CONTRAST else 0).getbbox()
        if box is None:
            return empty
        ink = ink.crop(box)
        if max(ink.size) > WORKING_SIZE:
            ink.thumbnail((WORKING_SIZE, WORKING_SIZE), Image.LANCZOS)
        ink = ImageOps.expand(ink, border=1)  # background all round, from which measure_ink tells stroke widths
    measure = measure_ink(np.asarray(ink))
    if measure is None:
        return empty
    x0, y0, x1, y1 = measure.box
    if max(x1 - x0, y1 - y0) < DOT_STROKES * measure.stroke_width:
        return empty
    low, high = digit_height
    scale = 1.0 if 0.9 * low <= measure.digit_height <= 1.1 * high else (low + high) / 2 / measure.digit_height
    if scale != 1.0 or max(ink.size) > canvas_size:
        ink = ink.crop(measure.box)  # beyond the ink there is only background
        scale = min(scale, (canvas_size - 2 * CANVAS_MARGIN) / max(ink.size))
        size = (max(1, round(ink.width * scale)), max(1, round(ink.height * scale)))
        ink = ink.resize(size, Image.LANCZOS if scale < 1 else Image.BILINEAR)
    canvas = Image.fromarray(empty)
    canvas.paste(ink, ((canvas_size - ink.width) // 2, (canvas_size - ink.height) // 2))
    return np.asarray(canvas)


def check_length_weights(weights: list[float] | tuple[float, ...], max_digits: int) -> None:
    """Raise ValueError unless weights can be the relative frequencies of 0, 1, ..., max_digits digits."""
    # Written so that NaN fails every comparison, and a finite sum keeps the frequencies finite.
    if len(weights) != max_digits + 1 or not all(w >= 0 for w in weights) or not 0 < sum(weights) < math.inf:
        raise ValueError(
            f"length_weights must be {max_digits + 1} non-negative numbers (for 0 to {max_digits} digits) "
            f"with a positive, finite sum, got {list(weights)}"
        )


class MultiDigitComposer:
    """Draws composites from a pool of MNIST digits. Arguments are checked here, before any work.

    length_weights are the relative frequencies of 0, 1, ..., max_digits digits (None: every count
    from min_digits to max_digits equally often). digit_height is the range of ink heights in both
    layouts. The rest are stress options, off by default: stroke_width_change replaces the random
    stroke augmentation by exactly that many pixels; aspect_stretch multiplies each digit's width
    by a random factor in that range; hug_borders pushes digits against the canvas edges;
    row_tilt rotates rows by up to that many degrees; scan_degradation passes every composite
    through degrade_like_a_scan.

    The wider world training draws from (off by default, so that evaluation sets hold digits as
    written): thickest_stroke spreads random thickening up to that many pixels; pen_share of the
    digits are redrawn with a round pen (redraw_with_pen); paper_noise of the composites lie on
    imperfect paper (add_paper_noise); touching_share of the rows are written with touching
    digits; nondigit_share of the composites hold marks that are not digits (draw_marks, label
    ""); overflow_share hold max_digits + 1 to max_digits + OVERFLOW_EXTRA digits, more than the
    model reads (their labels hold them all); elastic_share of the digits are bent by an elastic
    distortion (elastic_distort). A canvas with more digits than fit at the top of
    digit_height draws them smaller (height_limit)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        canvas_size: int = 96,
        min_digits: int = 0,
        max_digits: int = 4,
        length_weights: tuple[float, ...] | list[float] | None = None,
        layout: str = "mixed",
        augment_strength: float = 1.0,
        min_center_gap: int = 12,
        digit_height: tuple[int, int] | list[int] = DIGIT_HEIGHT_RANGE,
        stroke_width_change: int | None = None,
        aspect_stretch: tuple[float, float] | list[float] = (1.0, 1.0),
        hug_borders: bool = False,
        row_tilt: float = 0.0,
        scan_degradation: bool = False,
        thickest_stroke: int = 1,
        pen_share: float = 0.0,
        paper_noise: float = 0.0,
        touching_share: float = 0.0,
        nondigit_share: float = 0.0,
        overflow_share: float = 0.0,
        elastic_share: float = 0.0,
    ):
        self.images, self.labels = images, labels
        self.canvas_size, self.min_digits, self.max_digits = canvas_size, min_digits, max_digits
        self.length_weights, self.layout, self.augment_strength = length_weights, layout, augment_strength
        self.min_center_gap, self.digit_height, self.stroke_width_change = (
            min_center_gap,
            digit_height,
            stroke_width_change,
        )
        self.aspect_stretch, self.hug_borders = aspect_stretch, hug_borders
        self.row_tilt, self.scan_degradation = row_tilt, scan_degradation
        self.thickest_stroke, self.pen_share, self.paper_noise = thickest_stroke, pen_share, paper_noise
        self.touching_share, self.nondigit_share, self.overflow_share = touching_share, nondigit_share, overflow_share
        self.elastic_share = elastic_share
        self.check()  # before any work
        self.length_weights = None if length_weights is None else [float(w) for w in length_weights]
        self.digit_height = (int(digit_height[0]), int(digit_height[1]))
        self.aspect_stretch = (float(aspect_stretch[0]), float(aspect_stretch[1]))

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
        if self.length_weights is not None:
            check_length_weights(self.length_weights, self.max_digits)
            if any(self.length_weights[: self.min_digits]):
                raise ValueError(
                    f"length_weights {list(self.length_weights)} give weight to fewer than "
                    f"min_digits {self.min_digits} digits"
                )
        if self.min_center_gap < 1:
            raise ValueError(f"min_center_gap must be at least 1 pixel, got {self.min_center_gap}")
        if not 0 <= self.augment_strength <= MAX_AUGMENT_STRENGTH:  # false for NaN too
            raise ValueError(f"augment_strength must be 0 to {MAX_AUGMENT_STRENGTH:g}, got {self.augment_strength}")
        tallest = self.canvas_size - 2 * ROW_JITTER - 3  # a row needs room for its jitter and a pixel margin
        if (
            len(self.digit_height) != 2
            or not MIN_DIGIT_WIDTH <= self.digit_height[0] <= self.digit_height[1] <= tallest
        ):
            raise ValueError(
                f"digit_height must be (min, max) pixels with {MIN_DIGIT_WIDTH} <= min <= max <= {tallest} "
                f"on a {self.canvas_size}x{self.canvas_size} canvas, got {tuple(self.digit_height)}"
            )
        if self.stroke_width_change is not None and not -3 <= self.stroke_width_change <= 3:
            raise ValueError(
                f"stroke_width_change must be None (random) or -3 to 3 pixels, got {self.stroke_width_change}"
            )
        if (
            len(self.aspect_stretch) != 2
            or not 0 < self.aspect_stretch[0] <= self.aspect_stretch[1] <= MAX_ASPECT_STRETCH
        ):
            raise ValueError(
                f"aspect_stretch must be (min, max) factors with 0 < min <= max <= {MAX_ASPECT_STRETCH:g}, "
                f"got {tuple(self.aspect_stretch)}"
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
        digit = augment_digit(
            digit, rng, self.augment_strength, stroke=self.stroke_width_change, thickest=self.thickest_stroke
        )
        if self.elastic_share and rng.random() < self.elastic_share:
            digit = elastic_distort(digit, rng)
        if self.pen_share and rng.random() < self.pen_share:
            redrawn = redraw_with_pen(digit, radius=int(rng.integers(1, 5)))
            if ink_box(redrawn) is not None:  # a faint digit can vanish when thinned: it keeps its own strokes
                digit = redrawn
        crop = crop_to_ink(digit)
        if self.aspect_stretch != (1.0, 1.0):
            crop = resize(crop, crop.shape[0], max(1, round(crop.shape[1] * rng.uniform(*self.aspect_stretch))))
        return crop

    def compose(self, rng: np.random.Generator) -> Composite:
        # Each option draws from rng only when it is on, so that settings without it give the
        # same composites as before it existed.
        kind = rng.random() if self.nondigit_share or self.overflow_share else 1.0
        if kind < self.nondigit_share:
            canvas = draw_marks(rng, self.canvas_size, self.prepare_digit)
            label, layout, boxes, picks = "", "marks", [], []
        else:
            canvas, label, layout, boxes, picks = self.compose_digits(
                rng, overflow=kind < self.nondigit_share + self.overflow_share
            )
        if self.paper_noise and rng.random() < self.paper_noise:
            canvas = add_paper_noise(canvas, rng)
        if self.scan_degradation:
            canvas = degrade_like_a_scan(canvas, rng)
        return Composite(image=canvas, label=label, layout=layout, boxes=boxes, sources=picks)

    def compose_digits(self, rng: np.random.Generator, overflow: bool) -> tuple:
        """(canvas, label, layout, ink boxes, pool indices) of a composite of digits."""
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
        label = "".join(str(int(self.labels[i])) for i in picks)
        return canvas, label, layout, boxes, picks

    def settings(self) -> dict:
        """Everything that shapes the composites, JSON-ready: MultiDigitComposer(images, labels, **settings)
        rebuilds it."""
        return dict(
            canvas_size=self.canvas_size,
            min_digits=self.min_digits,
            max_digits=self.max_digits,
            length_weights=self.length_weights,
            layout=self.layout,
            augment_strength=self.augment_strength,
            min_center_gap=self.min_center_gap,
            digit_height=list(self.digit_height),
            stroke_width_change=self.stroke_width_change,
            aspect_stretch=list(self.aspect_stretch),
            hug_borders=self.hug_borders,
            row_tilt=self.row_tilt,
            scan_degradation=self.scan_degradation,
            thickest_stroke=self.thickest_stroke,
            pen_share=self.pen_share,
            paper_noise=self.paper_noise,
            touching_share=self.touching_share,
            nondigit_share=self.nondigit_share,
            overflow_share=self.overflow_share,
            elastic_share=self.elastic_share,
        )


class FreshComposites(Dataset):
    """num_images new composites per epoch: item i of epoch e is drawn with
    default_rng([seed, e, i]), so any worker, any order and a resumed run see the same data."""

    def __init__(self, composer: MultiDigitComposer, num_images: int, seed: int):
        self.composer, self.num_images, self.seed = composer, num_images, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str, torch.Tensor]:
        """An item as every dataset here gives it: see dataset_item."""
        c = self.composite(index)
        return dataset_item(c.image, c.label, c.layout, c.boxes, self.composer.most_digits)

    def composite(self, index: int) -> Composite:
        return self.composer.compose(np.random.default_rng([self.seed, self.epoch, index]))

    def composites(self, indices: list[int]) -> list[Composite]:
        return [self.composite(i) for i in indices]


class CachedComposites(Dataset):
    """The items of a FreshComposites read from disk instead of composed on the fly: the same
    images, labels and boxes (item i of epoch e is drawn with default_rng([seed, e, i]) either way),
    composed once, by every core, for any number of runs. Epoch e is a dataset folder (see
    write_dataset), read memory-mapped, at root/KEY/epoch-NNN, numbered from 1 as training counts
    epochs, where KEY is a digest of all that shapes the data: the composer's settings and digit
    pool, the seed, the images an epoch, this file's code and the libraries that draw pixels (an
    older cache must not serve what today's code would draw differently)."""

    def __init__(self, fresh: FreshComposites, root: str | Path):
        self.fresh = fresh
        self.folder = Path(root) / composites_key(fresh)
        self.opened: tuple[int, MultiDigitFolder] | None = None  # (epoch, its folder), opened by the process reading

    def epoch_folder(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch + 1:03d}"

    def missing(self, epochs: range | list[int]) -> list[int]:
        return [e for e in epochs if not self.epoch_folder(e).is_dir()]  # a folder there was written whole

    def compose(
        self,
        epochs: range | list[int],
        workers: int,
        progress: bool = True,
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        """Compose the epochs that are not on disk yet, workers processes at a time (0: here),
        each written whole or not at all, until stopped() says to stop. Processes composing into
        the same folder at once (the ranks of a torchrun, two runs of one training world) share
        the work: each epoch is composed under a lock by whichever takes it first, and the others
        wait for the epochs they found taken."""
        missing = self.missing(epochs)
        if not missing:
            return
        pending = [(epoch, False) for epoch in missing]  # (epoch, whether to wait for its lock)
        with tqdm(total=len(missing) * len(self), desc="composing epochs", unit="img", disable=not progress) as bar:
            while pending and not stopped():
                epoch, wait = pending.pop(0)
                with self.epoch_lock(epoch, wait) as held:
                    if not held:  # another process is composing it: come back to it last, and wait then
                        pending.append((epoch, True))
                        continue
                    if not self.epoch_folder(epoch).is_dir():  # else the lock's last holder wrote it
                        self.compose_epoch(epoch, workers, bar, stopped)
                        continue
                bar.update(len(self))

    @contextlib.contextmanager
    def epoch_lock(self, epoch: int, wait: bool) -> typing.Iterator[bool]:
        """Hold the lock of one epoch (True), or yield False where another process holds it and wait is False."""
        self.folder.mkdir(parents=True, exist_ok=True)  # exist_ok: another process may make it at once
        with open(self.folder / f".epoch-{epoch + 1:03d}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True  # the lock goes with the file's closing, or with the process however it ends

    def compose_epoch(self, epoch: int, workers: int, bar: tqdm, stopped: Callable[[], bool]) -> None:
        fresh = copy.copy(self.fresh)
        fresh.set_epoch(epoch)
        # The workers compose in the batching step (collate_fn), so each hands back whole
        # Composites, in index order. A generator of its own keeps the loader from drawing on
        # torch's, which training's dropout draws on.
        loader = DataLoader(
            range(len(fresh)),
            batch_size=64,
            num_workers=workers,
            collate_fn=fresh.composites,
            generator=torch.Generator(),
            worker_init_fn=leave_ctrl_c_to_the_parent,
        )
        composites = []
        for batch in loader:
            if stopped():
                return
            composites += batch
            bar.update(len(batch))
        composer = fresh.composer
        settings = dict(seed=fresh.seed, images_per_epoch=len(fresh), composer=composer.settings())
        metadata = dict(settings, epoch=epoch + 1, max_digits=composer.most_digits, canvas_size=composer.canvas_size)
        write_dataset(self.epoch_folder(epoch), composites, metadata)

    def set_epoch(self, epoch: int) -> None:
        if not self.epoch_folder(epoch).is_dir():
            raise FileNotFoundError(
                f"{self.epoch_folder(epoch)} is missing: compose it first (CachedComposites.compose)"
            )
        self.fresh.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.fresh)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str, torch.Tensor]:
        return self.epoch_data()[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, str, str, torch.Tensor]]:
        return self.epoch_data().__getitems__(indices)

    def epoch_data(self) -> MultiDigitFolder:
        # Opened by the process that reads (a DataLoader worker), rather than in set_epoch, so
        # that no memory map is handed to a worker process.
        if self.opened is None or self.opened[0] != self.fresh.epoch:
            self.opened = (self.fresh.epoch, MultiDigitFolder(self.epoch_folder(self.fresh.epoch)))
        return self.opened[1]


def leave_ctrl_c_to_the_parent(worker_id: int) -> None:
    """A composing worker ignores Ctrl-C, which a terminal sends its whole process group: the
    process that started it decides when to stop, between batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def composites_key(fresh: FreshComposites) -> str:
    """A digest naming everything that decides a FreshComposites' data (see CachedComposites)."""
    composer = fresh.composer
    digest = hashlib.sha256(Path(__file__).read_bytes())
    versions = [np.__version__, torch.__version__, PIL.__version__]
    digest.update(json.dumps([composer.settings(), fresh.seed, len(fresh), versions], sort_keys=True).encode())
    digest.update(np.ascontiguousarray(composer.images).tobytes())
    digest.update(np.asarray(composer.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


class MultiDigitFolder(Dataset):
    """A dataset folder written by write_dataset, its items shaped as dataset_item's."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.images, self.records, self.metadata = read_dataset(self.folder)
        self.max_digits = max([self.metadata.get("max_digits", 0), *(len(r["label"]) for r in self.records)])
        self.boxes = torch.stack([padded_boxes(r["boxes"], self.max_digits) for r in self.records])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, str, str, torch.Tensor]]:
        """Items as dataset_item shapes them, their images read from the memory map in one go (a
        DataLoader asks for a batch's items so): item by item, a reader would spend more time in
        Python than a GPU spends training on them."""
        images = torch.from_numpy(self.images[indices])
        return [
            (image, self.records[i]["label"], self.records[i]["layout"], self.boxes[i])
            for i, image in zip(indices, images)
        ]


def dataset_item(
    image: np.ndarray, label: str, layout: str, boxes: list, most: int
) -> tuple[torch.Tensor, str, str, torch.Tensor]:
    """(canvas (H, W) uint8, label, layout, ink boxes (see padded_boxes))."""
    return torch.from_numpy(image), label, layout, padded_boxes(boxes, most)


def padded_boxes(boxes: list, most: int) -> torch.Tensor:
    """Ink boxes (most, 4), x0, y0, x1, y1 in label order, padded with -1 rows so that a batch's
    boxes stack into one tensor."""
    padded = torch.full((most, 4), -1, dtype=torch.long)
    if len(boxes):
        padded[: len(boxes)] = torch.tensor(boxes, dtype=torch.long)
    return padded


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


def read_digit_indices(path: str | Path, split: str) -> np.ndarray:
    """The MNIST indices that a --digit-indices JSON file lists, each checked against the split."""
    count = MNIST_COUNTS[split]
    try:
        indices = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:  # missing, unreadable, not UTF-8 or not JSON
        raise ValueError(f"--digit-indices {path} cannot be read as JSON ({error})") from error
    # type() rather than isinstance: JSON's true is an int to Python, and 1.5 must not be cut to 1.
    if not isinstance(indices, list) or not indices or not all(type(i) is int and 0 <= i < count for i in indices):
        raise ValueError(
            f"--digit-indices {path}: expected a non-empty JSON list of whole numbers from 0 to {count - 1}, "
            f"indices into the {count} MNIST {split} digits"
        )
    return np.asarray(indices, dtype=np.int64)


def check_destination(path: str | Path, files: tuple[str, ...] | None) -> None:
    """Raise ValueError unless Staging may write path: nothing is there yet, or what it would replace
    is (with files) a folder holding only those files or (without) a file, and no file stands in the
    way of its parent folders. Scripts call it before any work, so that a bad --out fails at once."""
    path = Path(path)
    if path.name in ("", ".."):
        raise ValueError(f"{path} names no folder or file to write: give a path such as data/demo")
    nearest = next(parent for parent in path.parents if parent.exists())
    if not nearest.is_dir():
        raise ValueError(f"cannot write {path}: {nearest} is a file, not a folder")
    if not os.path.lexists(path):
        return
    if files is None:
        if path.is_dir():
            raise ValueError(f"{path} is a folder, where a file is to be written: move it away")
        return
    if not path.is_dir():
        raise ValueError(f"{path} is a file, where a folder is to be written: choose another path")
    others = sorted(entry.name for entry in path.iterdir() if entry.name not in files)
    if others:
        raise ValueError(
            f"{path} is replaced whole when written, and it holds {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''} besides {', '.join(files)}: choose another folder or move them away"
        )


def remove(path: Path) -> None:
    """Delete a file, a link or a folder with everything in it, as far as possible."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


class Staging:
    """Writes folders and files beside their destinations, then moves them all into place together,
    so that each is written whole or not at all. As a context manager, its block writes into the
    temporary paths that folder() and file() hand out; when the block ends they are moved into
    place, each replacing what was there (see check_destination) only then, and if the block raises,
    they are removed with any parent folders made for them. If a move fails, those already made are
    undone: what was there before is put back."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (temporary path, destination)
        self.made: list[Path] = []  # parent folders made for the destinations, outermost first

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def folder(self, path: str | Path, files: tuple[str, ...]) -> Path:
        """A new empty folder in which to write the files (these only) of the folder path."""
        return self._stage(Path(path), files)

    def file(self, path: str | Path) -> Path:
        """A new empty file in which to write the file path."""
        return self._stage(Path(path), None)

    def _stage(self, path: Path, files: tuple[str, ...] | None) -> Path:
        check_destination(path, files)
        for parent in reversed(path.parents):
            if not parent.exists():
                parent.mkdir()
                self.made.append(parent)
        # A new name beside the destination, made as open() and mkdir() make any file or folder (the
        # umask applies, where mkstemp's and mkdtemp's would be private).
        name = path.with_name(f".{path.name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
        if files is None:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        else:
            name.mkdir()
        self.staged.append((name, path))
        return name

    def commit(self) -> None:
        """Move everything staged into place (what the block's end does)."""
        renames: list[tuple[Path, Path]] = []  # (from, to) made so far, undone in reverse order if one fails
        older: list[Path] = []  # where what was at the destinations went
        try:
            for temporary, path in self.staged:
                if os.path.lexists(path):
                    older.append(temporary.with_name(temporary.name + ".older"))
                    os.rename(path, older[-1])
                    renames.append((path, older[-1]))
                os.rename(temporary, path)
                renames.append((temporary, path))
        except BaseException:
            for source, target in reversed(renames):
                os.rename(target, source)
            self.discard()
            raise
        for path in older:
            remove(path)
        self.staged, self.made = [], []

    def discard(self) -> None:
        """Remove everything staged and the parent folders made for it (what an exception does)."""
        for temporary, _ in self.staged:
            remove(temporary)
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                folder.rmdir()
        self.staged, self.made = [], []


def write_dataset(folder: str | Path, composites: list[Composite], metadata: dict) -> Path:
    """Write images.npy (N, H, W) uint8, labels.json (one record per image), metadata.json
    (generation parameters and counts) and preview.png (the first images with their labels), whole
    or not at all (see Staging): an older dataset folder there is replaced only once the new one is
    written. Raises ValueError when something else is in the way (see check_destination)."""
    with Staging() as staging:
        write_dataset_files(staging.folder(folder, DATASET_FILES), composites, metadata)
    return Path(folder)


def write_dataset_files(folder: Path, composites: list[Composite], metadata: dict) -> None:
    """write_dataset's files, into an existing folder (one that Staging hands out)."""
    size = metadata.get("canvas_size", 96)
    images = np.stack([c.image for c in composites]) if composites else np.zeros((0, size, size), np.uint8)
    np.save(folder / "images.npy", images)
    records = [dict(label=c.label, layout=c.layout, boxes=c.boxes, sources=c.sources) for c in composites]
    (folder / "labels.json").write_text(json.dumps(records))
    counts = dict(
        num_images=len(composites),
        per_length={str(k): v for k, v in sorted(Counter(len(c.label) for c in composites).items())},
        per_layout=dict(sorted(Counter(c.layout for c in composites).items())),
    )
    (folder / "metadata.json").write_text(json.dumps({**metadata, **counts}, indent=2) + "\n")
    preview_sheet([c.image for c in composites[:32]], [c.label for c in composites[:32]]).save(folder / "preview.png")


def read_dataset(folder: str | Path) -> tuple[np.ndarray, list[dict], dict]:
    """The images (N, H, W) uint8, memory-mapped, the N records of labels.json and the metadata of a
    dataset folder. Raises FileNotFoundError for a missing file, and ValueError naming the file for
    one unlike what write_dataset writes (naming the first bad record by its index)."""
    folder = Path(folder)
    missing = [name for name in DATASET_FILES[:3] if not (folder / name).is_file()]  # all but the preview
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a dataset folder: missing {', '.join(missing)} (write one with multidigit_generator.py)"
        )
    records = read_json(folder / "labels.json", list, "a JSON list of records")
    for index, record in enumerate(records):
        problem = record_problem(record)
        if problem:
            raise ValueError(f"{folder / 'labels.json'}: record {index} {problem}")
    metadata = read_json(folder / "metadata.json", dict, "a JSON object")
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
    except (ValueError, EOFError) as error:  # not an .npy file, one cut short, or one of Python objects
        raise ValueError(f"{folder / 'images.npy'} is not a readable .npy array ({error}): write it again") from error
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{folder / 'images.npy'} holds a {images.dtype} array of shape {images.shape}, "
            "not images (N, H, W) uint8: write it again"
        )
    if len(images) != len(records):
        raise ValueError(f"{folder}: images.npy holds {len(images)} images, labels.json {len(records)} records")
    return images, records, metadata


def read_json(path: Path, kind: type, description: str) -> Any:
    """The JSON value in path, which must be of kind (list or dict); ValueError naming the file if not."""
    try:
        value = json.loads(path.read_text())
    except ValueError as error:  # not JSON, or not UTF-8
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(value, kind):
        raise ValueError(f"{path} must hold {description}, not {reprlib.repr(value)}")
    return value


def record_problem(record: object) -> str | None:
    """What is wrong with one labels.json record, or None: each is an object whose "label" is a
    string of the digits 0-9 ("" for a blank canvas) and whose "layout" is one of COMPOSITE_LAYOUTS."""
    if not isinstance(record, dict):
        return f"is {reprlib.repr(record)}, not an object with a label and a layout"
    if "label" not in record:
        return 'has no "label"'
    label, layout = record["label"], record.get("layout")
    if not isinstance(label, str) or not set(label) <= set(string.digits):  # str.isdigit() would take "²"
        return f'has the label {reprlib.repr(label)}, not a string of the digits 0-9 ("" for a blank canvas)'
    if layout not in COMPOSITE_LAYOUTS:
        return f"has the layout {reprlib.repr(layout)}, not one of {', '.join(COMPOSITE_LAYOUTS)}"
    return None


def preview_sheet(images: list[np.ndarray], captions: list[str], columns: int = 8, scale: int = 2) -> Image.Image:
    """A grid of images, each with its caption underneath ("-" for an empty label)."""
    if not images:
        return Image.new("RGB", (200, 40), "white")
    h, w = images[0].shape
    font = ImageFont.load_default(size=14 * scale // 2 + 4)
    cell_w, cell_h, caption_h = w * scale + 6, h * scale + 6 + 22, 22
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (cell_w * min(columns, len(images)), cell_h * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w + 3, (i // columns) * cell_h + 3
        sheet.paste(Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST), (x, y))
        draw.text(
            (x + w * scale // 2, y + h * scale + caption_h // 2), caption or "-", fill="black", font=font, anchor="mm"
        )
    return sheet


def parse_weights(text: str) -> list[float]:
    """Parse "1,3,5,7,9" into [1.0, 3.0, 5.0, 7.0, 9.0], for argparse."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,3,5,7,9, got {text!r}") from None


def add_composer_arguments(parser: argparse.ArgumentParser) -> None:
    """The composition flags shared by this command and split_multidigit_dataset.py."""
    parser.add_argument(
        "--mnist-root",
        default=default_mnist_root(),
        help="folder holding MNIST/raw/ (default: $MNIST_ROOT or data); downloaded there if missing",
    )
    parser.add_argument("--canvas-size", type=int, default=96)
    parser.add_argument("--min-digits", type=int, default=0)
    parser.add_argument("--max-digits", type=int, default=4)
    parser.add_argument(
        "--length-weights",
        type=parse_weights,
        metavar="W0,W1,...",
        help="relative frequencies of 0, 1, ..., max-digits digits (default: min to max digits equally often)",
    )
    parser.add_argument("--layout", choices=LAYOUTS, default="mixed")
    parser.add_argument("--augment-strength", type=float, default=1.0, help="0 turns per-digit augmentation off")
    parser.add_argument(
        "--min-center-gap", type=int, default=12, help="scatter: least horizontal distance between digit centres"
    )
    parser.add_argument(
        "--digit-height",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=list(DIGIT_HEIGHT_RANGE),
        help="range of digit ink heights in pixels, both layouts (default: %(default)s)",
    )
    wider = parser.add_argument_group("the wider world training draws from (off by default)")
    wider.add_argument("--thickest-stroke", type=int, default=1, help="random thickening of up to this many pixels")
    wider.add_argument("--row-tilt", type=float, default=0.0, help="rows tilted by up to this many degrees")
    for name, what in (
        ("pen-share", "share of digits and marks redrawn with a round pen, as a drawing pad makes them"),
        ("paper-noise", "share of composites on imperfect paper: grey, ruled, speckled, dusty, scanned"),
        ("touching-share", "share of rows whose digits touch"),
        ("nondigit-share", 'share of composites holding marks that are not digits (label "")'),
        ("overflow-share", f"share of composites with 1-{OVERFLOW_EXTRA} digits more than --max-digits"),
    ):
        wider.add_argument(f"--{name}", type=float, default=0.0, help=what)


# The composition flags add_composer_arguments defines, by their MultiDigitComposer names.
COMPOSER_FLAGS = (
    "canvas_size",
    "min_digits",
    "max_digits",
    "length_weights",
    "layout",
    "augment_strength",
    "min_center_gap",
    "digit_height",
    "thickest_stroke",
    "row_tilt",
    "pen_share",
    "paper_noise",
    "touching_share",
    "nondigit_share",
    "overflow_share",
)


def composer_settings(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in COMPOSER_FLAGS}


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
