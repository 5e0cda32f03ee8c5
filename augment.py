"""How one digit (or one canvas) is changed before it is composed: random rotation, shear, scale
and stroke width (augment_digit), elastic distortion, a round pen redrawing the strokes, imperfect
paper and the look of a scan; and the small image operations these are made of.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ELASTIC_ALPHA, ELASTIC_SIGMA = 34.0, 4.0  # Simard et al. (2003)'s elastic distortion of a 28x28 digit, in pixels


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
    fade = stroke is None
    if strength > 0:
        angle, shear = rng.uniform(-12, 12) * strength, rng.uniform(-10, 10) * strength
        scale = math.exp(rng.uniform(-0.1, 0.1) * strength)
        if stroke is None:
            p_change = 0.2 * min(strength, 2.5)
            changes = [-1, 0, *range(1, thickest + 1)]
            stroke = int(rng.choice(changes, p=[p_change, 1 - 2 * p_change, *[p_change / thickest] * thickest]))
        # On a PIL image, which is faster than on a tensor: training composes every digit afresh.
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
    blurred = gaussian_blur(torch.from_numpy(image)[None].float(), rng.uniform(0.5, 1.2))
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
