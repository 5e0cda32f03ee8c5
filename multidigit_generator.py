"""Compose MNIST digits into multi-digit images, as a library and as a command.

Two layouts, both white digits on a black canvas (96x96 by default), 0-4 digits each:
  scatter  28x28 digits dropped at random, non-overlapping; the label reads them left to
           right by centre, and placements whose centres are horizontally closer than
           --min-center-gap are redrawn so that order is never ambiguous.
  row      a number written left to right: each digit cropped to its ink, scaled to a
           height of about 18-28 px, with random gaps and a little vertical jitter.
Every digit is augmented first (small rotation, shear, scale; thinner or thicker strokes).

All randomness comes from one seed: image i of a dataset is drawn with
numpy.random.default_rng([seed, i]), so the same seed gives the same bytes whatever the
order or the number of processes. Training uses the same composer to draw fresh
composites every epoch (FreshComposites), so it never sees the same composite twice.

    uv run python multidigit_generator.py --split test --num-images 1000 --out data/demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset
from tqdm import tqdm

DIGIT_SIZE = 28  # MNIST digits are 28x28
LAYOUTS = ("scatter", "row", "mixed")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
ROW_HEIGHT_RANGE = (18, 28)  # ink height of a digit written in a row, in pixels
ROW_MIN_DIGIT_WIDTH = 6  # narrowest ink a row digit is squeezed to (a thin "1")


class MnistUnavailableError(RuntimeError):
    """MNIST is neither on disk nor downloadable."""


def default_mnist_root() -> str:
    return os.environ.get("MNIST_ROOT", "data")


def load_mnist(root: str | Path, *, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images (N, 28, 28) uint8 and labels (N,) int64 from root/MNIST/raw.

    Uses torchvision, which downloads the files if they are missing and finds them
    (downloading nothing) if they are there."""
    import torchvision  # imported here: it is slow to import and only needed for loading

    try:
        mnist = torchvision.datasets.MNIST(root=str(root), train=train, download=True)
    except Exception as error:  # no network, a refused mirror, a corrupt file, ...
        raw = Path(root) / "MNIST" / "raw"
        raise MnistUnavailableError(
            f"MNIST is not in {raw} and could not be downloaded ({type(error).__name__}: {error}).\n"
            f"Put the four MNIST files {', '.join(MNIST_FILES)} (or their .gz versions) in {raw}/, "
            "or point --mnist-root or the MNIST_ROOT environment variable at a folder that has "
            "MNIST/raw/ with them."
        ) from error
    return mnist.data.numpy(), mnist.targets.numpy().astype(np.int64)


def augment_digit(digit: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Small random rotation, shear and scale, then thinner or thicker strokes.

    strength scales every range (0 turns augmentation off); 1.0 gives rotations up to
    12 degrees, shears up to 10 degrees, scales 0.9-1.1 and a one-pixel stroke change on
    40 % of digits."""
    if strength <= 0:
        return digit
    angle, shear = rng.uniform(-12, 12) * strength, rng.uniform(-10, 10) * strength
    scale = math.exp(rng.uniform(-0.1, 0.1) * strength)
    stroke = rng.choice([-1, 0, 1], p=[0.2 * min(strength, 2.5), 1 - 0.4 * min(strength, 2.5), 0.2 * min(strength, 2.5)])
    image = torch.from_numpy(digit)[None].float()
    image = TF.affine(image, angle=angle, translate=[0, 0], scale=scale, shear=[shear, 0.0],
                      interpolation=TF.InterpolationMode.BILINEAR)
    if stroke == 1:  # dilate: a 2x2 max grows strokes by a pixel
        image = F.max_pool2d(F.pad(image[None], (0, 1, 0, 1)), 2, stride=1)[0]
    elif stroke == -1:  # erode, blended with the original so thin strokes fade instead of vanishing
        eroded = -F.max_pool2d(F.pad(-image[None], (0, 1, 0, 1), value=-255.0), 2, stride=1)[0]
        image = 0.5 * (image + eroded)
    return image[0].round().clamp(0, 255).to(torch.uint8).numpy()


def ink_box(image: np.ndarray, threshold: int = 32) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), exclusive ends, of the pixels brighter than threshold; None if none."""
    ys, xs = np.nonzero(image > threshold)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    out = TF.resize(torch.from_numpy(image)[None], [height, width], antialias=True)
    return out[0].numpy()


@dataclass
class Composite:
    image: np.ndarray  # (canvas, canvas) uint8, white on black
    label: str  # the digits in reading order, "" for a blank canvas
    layout: str  # "scatter" or "row"
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (x0, y0, x1, y1) per digit, label order
    sources: list[int] = field(default_factory=list)  # index of each digit in the MNIST split, label order


def scatter_capacity(canvas_size: int, min_center_gap: int) -> int:
    """How many 28x28 digits the scatter layout can always place: one row with centres a
    digit apart, or two rows staggered with centres max(gap, 14) apart."""
    if canvas_size < DIGIT_SIZE:
        return 0
    free = canvas_size - DIGIT_SIZE
    one_row = free // max(min_center_gap, DIGIT_SIZE) + 1
    two_rows = free // max(min_center_gap, math.ceil(DIGIT_SIZE / 2)) + 1 if canvas_size >= 2 * DIGIT_SIZE else 0
    return max(one_row, two_rows)


def row_capacity(canvas_size: int) -> int:
    return max(0, (canvas_size - 2) // (ROW_MIN_DIGIT_WIDTH + 1))


def compose_scatter(
    digits: list[np.ndarray], rng: np.random.Generator, canvas_size: int, min_center_gap: int, max_tries: int = 200
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int]]:
    """Place 28x28 digits at random without overlap; returns the canvas, the boxes in
    reading order and, for each box, which input digit it holds."""
    n, span = len(digits), canvas_size - DIGIT_SIZE
    corners: list[tuple[int, int]] = []
    for _ in range(max_tries):
        corners = []
        for _ in range(n):
            for _ in range(max_tries):
                x, y = (int(v) for v in rng.integers(0, span + 1, size=2))
                clear = all(
                    abs(x - px) >= min_center_gap and (abs(x - px) >= DIGIT_SIZE or abs(y - py) >= DIGIT_SIZE)
                    for px, py in corners
                )
                if clear:
                    corners.append((x, y))
                    break
            else:
                break
        if len(corners) == n:
            break
    else:
        # Crowded canvases can defeat rejection sampling: fall back to one row, or to two
        # staggered rows where same-row neighbours are 2 * step >= 28 px apart (always
        # feasible within scatter_capacity), at a random offset.
        step = max(min_center_gap, math.ceil(DIGIT_SIZE / 2))
        if (n - 1) * max(step, DIGIT_SIZE) <= span:
            step, top = max(step, DIGIT_SIZE), int(rng.integers(0, span + 1))
            rows = [top, top]
        else:
            top = int(rng.integers(0, span - DIGIT_SIZE + 1))
            rows = [top, top + DIGIT_SIZE]
        x0 = int(rng.integers(0, span - (n - 1) * step + 1))
        corners = [(x0 + i * step, rows[i % 2]) for i in range(n)]
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    for digit, (x, y) in zip(digits, corners):
        np.maximum(canvas[y : y + DIGIT_SIZE, x : x + DIGIT_SIZE], digit, out=canvas[y : y + DIGIT_SIZE, x : x + DIGIT_SIZE])
    order = sorted(range(n), key=lambda i: corners[i][0])  # box centres are corner + 14
    boxes = [(corners[i][0], corners[i][1], corners[i][0] + DIGIT_SIZE, corners[i][1] + DIGIT_SIZE) for i in order]
    return canvas, boxes, order


def compose_row(
    digits: list[np.ndarray], rng: np.random.Generator, canvas_size: int
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Write the digits left to right like a handwritten number; returns the canvas and the
    ink box of each digit."""
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    if not digits:
        return canvas, []
    crops = []
    for digit in digits:
        box = ink_box(digit)
        crops.append(digit if box is None else digit[box[1] : box[3], box[0] : box[2]])
    height = rng.uniform(*ROW_HEIGHT_RANGE)
    sizes = []
    for crop in crops:
        h = height * rng.uniform(0.9, 1.1)
        sizes.append((h, max(ROW_MIN_DIGIT_WIDTH, crop.shape[1] * h / crop.shape[0])))
    gaps = rng.uniform(1, 6, size=len(digits) - 1)
    # Shrink the whole number if it would not fit (only with many digits or a small canvas).
    width = sum(w for _, w in sizes) + gaps.sum()
    shrink = min(1.0, (canvas_size - 2) / width, (canvas_size - 8) / max(h for h, _ in sizes))
    sizes = [(max(4, round(h * shrink)), max(ROW_MIN_DIGIT_WIDTH, round(w * shrink))) for h, w in sizes]
    gaps = np.maximum(1, np.round(gaps * shrink)).astype(int)
    width = sum(w for _, w in sizes) + int(gaps.sum())
    tallest = max(h for h, _ in sizes)
    x = int(rng.integers(1, max(1, canvas_size - width - 1) + 1))
    centre_y = rng.uniform(tallest / 2 + 4, canvas_size - tallest / 2 - 4)
    boxes = []
    for i, (crop, (h, w)) in enumerate(zip(crops, sizes)):
        y = int(np.clip(round(centre_y - h / 2 + rng.uniform(-3, 3)), 0, canvas_size - h))
        x = min(x, canvas_size - w)
        patch = resize(crop, h, w)
        np.maximum(canvas[y : y + h, x : x + w], patch, out=canvas[y : y + h, x : x + w])
        boxes.append((x, y, x + w, y + h))
        x += w + (int(gaps[i]) if i < len(gaps) else 0)
    return canvas, boxes


class MultiDigitComposer:
    """Draws composites from a pool of MNIST digits. Arguments are checked here, before any work."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        canvas_size: int = 96,
        min_digits: int = 0,
        max_digits: int = 4,
        layout: str = "mixed",
        augment_strength: float = 1.0,
        min_center_gap: int = 12,
    ):
        if images.ndim != 3 or images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or images.dtype != np.uint8:
            raise ValueError(f"expected MNIST digits as (N, 28, 28) uint8, got {images.shape} {images.dtype}")
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"need a non-empty pool with one label per digit, got {len(images)} images and {len(labels)} labels")
        if canvas_size < DIGIT_SIZE:
            raise ValueError(f"canvas_size must be at least {DIGIT_SIZE}, got {canvas_size}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if not 0 <= min_digits <= max_digits:
            raise ValueError(f"need 0 <= min_digits <= max_digits, got {min_digits} and {max_digits}")
        if min_center_gap < 1:
            raise ValueError(f"min_center_gap must be at least 1 pixel, got {min_center_gap}")
        if augment_strength < 0:
            raise ValueError(f"augment_strength must be >= 0, got {augment_strength}")
        fits = {"scatter": scatter_capacity(canvas_size, min_center_gap), "row": row_capacity(canvas_size)}
        for name in ("scatter", "row") if layout == "mixed" else (layout,):
            if max_digits > fits[name]:
                raise ValueError(
                    f"{max_digits} digits do not fit on a {canvas_size}x{canvas_size} canvas in the {name} layout "
                    f"(at most {fits[name]}" + (f" with a minimum centre gap of {min_center_gap} px" if name == "scatter" else "")
                    + "): lower --max-digits or raise --canvas-size"
                )
        self.images, self.labels = images, labels
        self.canvas_size, self.min_digits, self.max_digits = canvas_size, min_digits, max_digits
        self.layout, self.augment_strength, self.min_center_gap = layout, augment_strength, min_center_gap

    def compose(self, rng: np.random.Generator) -> Composite:
        n = int(rng.integers(self.min_digits, self.max_digits + 1))
        layout = str(rng.choice(["scatter", "row"])) if self.layout == "mixed" else self.layout
        picks = [int(i) for i in rng.integers(0, len(self.images), size=n)]
        digits = [augment_digit(self.images[i], rng, self.augment_strength) for i in picks]
        if layout == "scatter":
            canvas, boxes, order = compose_scatter(digits, rng, self.canvas_size, self.min_center_gap)
            picks = [picks[i] for i in order]
        else:
            canvas, boxes = compose_row(digits, rng, self.canvas_size)
        label = "".join(str(int(self.labels[i])) for i in picks)
        return Composite(image=canvas, label=label, layout=layout, boxes=boxes, sources=picks)

    def settings(self) -> dict:
        return dict(canvas_size=self.canvas_size, min_digits=self.min_digits, max_digits=self.max_digits,
                    layout=self.layout, augment_strength=self.augment_strength, min_center_gap=self.min_center_gap)


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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str]:
        c = self.composer.compose(np.random.default_rng([self.seed, self.epoch, index]))
        return torch.from_numpy(c.image), c.label, c.layout


class MultiDigitFolder(Dataset):
    """A dataset folder written by write_dataset: (image uint8 (H, W), label, layout) items."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.images, self.records, self.metadata = read_dataset(self.folder)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str]:
        record = self.records[index]
        return torch.from_numpy(np.array(self.images[index])), record["label"], record["layout"]


def generate(
    composer: MultiDigitComposer, num_images: int, seed: int, *, pool_indices: np.ndarray | None = None, progress: bool = True
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


def write_dataset(folder: str | Path, composites: list[Composite], metadata: dict) -> Path:
    """Write images.npy (N, H, W) uint8, labels.json (one record per image), metadata.json
    (generation parameters and counts) and preview.png (the first images with their labels)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
    return folder


def read_dataset(folder: str | Path) -> tuple[np.ndarray, list[dict], dict]:
    folder = Path(folder)
    missing = [name for name in ("images.npy", "labels.json", "metadata.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a dataset folder: missing {', '.join(missing)} (write one with multidigit_generator.py)")
    images = np.load(folder / "images.npy", mmap_mode="r")
    records = json.loads((folder / "labels.json").read_text())
    metadata = json.loads((folder / "metadata.json").read_text())
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(records):
        raise ValueError(f"{folder}: images.npy {images.shape} {images.dtype} does not match {len(records)} labels")
    return images, records, metadata


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
        draw.text((x + w * scale // 2, y + h * scale + caption_h // 2), caption or "-", fill="black", font=font, anchor="mm")
    return sheet


def add_composer_arguments(parser: argparse.ArgumentParser) -> None:
    """The composition flags shared by this command and split_multidigit_dataset.py."""
    parser.add_argument("--mnist-root", default=default_mnist_root(),
                        help="folder holding MNIST/raw/ (default: $MNIST_ROOT or data); downloaded there if missing")
    parser.add_argument("--canvas-size", type=int, default=96)
    parser.add_argument("--min-digits", type=int, default=0)
    parser.add_argument("--max-digits", type=int, default=4)
    parser.add_argument("--layout", choices=LAYOUTS, default="mixed")
    parser.add_argument("--augment-strength", type=float, default=1.0, help="0 turns per-digit augmentation off")
    parser.add_argument("--min-center-gap", type=int, default=12, help="scatter: least horizontal distance between digit centres")


def composer_settings(args: argparse.Namespace) -> dict:
    return dict(canvas_size=args.canvas_size, min_digits=args.min_digits, max_digits=args.max_digits, layout=args.layout,
                augment_strength=args.augment_strength, min_center_gap=args.min_center_gap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="which MNIST split the digits come from")
    parser.add_argument("--digit-indices", help="JSON file with a list of MNIST indices to draw from (default: the whole split)")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    add_composer_arguments(parser)
    args = parser.parse_args(argv)
    if args.num_images < 0:
        parser.error(f"--num-images must be >= 0, got {args.num_images}")
    try:
        check_composer_settings(**composer_settings(args))
        images, labels = load_mnist(args.mnist_root, train=args.split == "train")
        indices = np.arange(len(images))
        if args.digit_indices:
            indices = np.asarray(json.loads(Path(args.digit_indices).read_text()), dtype=np.int64)
            if indices.ndim != 1 or len(indices) == 0 or indices.min() < 0 or indices.max() >= len(images):
                raise ValueError(f"{args.digit_indices}: expected a non-empty list of indices into the {len(images)} MNIST {args.split} digits")
        composer = MultiDigitComposer(images[indices], labels[indices], **composer_settings(args))
    except (ValueError, OSError, MnistUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    composites = generate(composer, args.num_images, args.seed, pool_indices=indices)
    meta = dict(composer.settings(), seed=args.seed, mnist_split=args.split, digit_indices=args.digit_indices)
    folder = write_dataset(args.out, composites, meta)
    print(f"wrote {len(composites)} images to {folder} (preview: {folder / 'preview.png'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
