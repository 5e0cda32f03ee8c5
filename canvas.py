"""Any image as the model's canvas: the one transform with which predict.py, the front end and
evaluate.py --as-files read images, so that what is measured is what users get.

to_canvas finds the ink (dark on light or light on dark, any mode and depth, transparency),
measures its digits' height and stroke width, and scales and centres it so that the digits
come out as tall as the composer draws them (docs/design.md explains each step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageOps

from augment import ink_box
from multidigit_generator import DIGIT_HEIGHT_RANGE

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
    16-bit paper and ink alike white. The 16-bit modes span 0-65535; "I" and "F" have no fixed
    range, so theirs is the narrowest that holds the brightest pixel: 0-255, 0-65535 (16-bit data
    stored wider), else 0 up to that pixel; for "F" first 0-1, the usual range of float images.
    Negative and non-finite values count as 0."""
    levels = np.array(image, dtype=np.float32)  # a writable copy, scaled in place
    np.nan_to_num(levels, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    np.maximum(levels, 0.0, out=levels)  # before scaling, which would overflow the most negative floats
    top = float(levels.max())
    if image.mode.startswith("I;16"):
        full_range = 65535.0
    elif image.mode == "F" and top <= 1.0:
        full_range = 1.0
    else:
        full_range = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    levels *= 255.0 / full_range
    np.minimum(levels, 255.0, out=levels)
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
    ink_of_level = np.arange(256.0)
    if alpha is not None:
        # Transparent background (a drawing pad): ink is wherever it is opaque. Strokes may be
        # dark or light; which one decides whether their grey level or its inverse is the ink.
        # ImageChops.multiply is a * b / 255, so the sums below are of grey * alpha / 255 and of alpha.
        dark_strokes = 255 * histogram_sum(ImageChops.multiply(grey, alpha)) < 128 * histogram_sum(alpha)
        ink = ImageChops.multiply(alpha, ImageOps.invert(grey) if dark_strokes else grey)
    else:
        # Opaque: the border is mostly background, so its median tells paper from ink.
        width, height = grey.size
        edges = [(0, 0, width, 1), (0, height - 1, width, height), (0, 0, 1, height), (width - 1, 0, width, height)]
        border = np.concatenate([np.asarray(grey.crop(edge), dtype=np.float64).ravel() for edge in edges])
        paper = np.median(border)
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
    """The model's view of an image: (canvas_size, canvas_size) uint8, white ink on black, its ink
    scaled to the middle of digit_height where the digits' height (measure_ink) is outside it, and
    centred, shrunk further only to fit: a canvas with digits of a trained size reaches the model
    unchanged. No ink, or only a dot (a tap on a drawing pad, a speck), gives an empty canvas."""
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
