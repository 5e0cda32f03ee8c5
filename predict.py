r"""Read the digits in image files with a trained checkpoint.

    uv run python predict.py photo.png scans/            # path<TAB>digits per image
    uv run python predict.py --jsonl --beam-size 4 a.png  # {"path", "digits", "unsure", ...} per line

Each reading comes with a calibrated confidence (the probability that the whole reading is
right). Below the checkpoint's threshold (chosen on validation; --min-confidence overrides it)
the reading is unsure: the line ends in "?", and under --jsonl "unsure" is true and
"alternatives" lists the most probable readings by beam search. An image with more digits
than the model reads (4 for the shipped model) gets its first digits and "+" ("too_many": true).

Any PNG/JPEG/... of any size and mode works, 16-bit and float greyscale included: it is turned
into white digits on black (dark ink on light paper is inverted, transparent backgrounds
handled), its digits are scaled to the height the model was trained on keeping their aspect
ratio, and the ink is centred on the model's canvas (canvas.to_canvas, which the
front end and evaluate.py --as-files use too). A file that cannot be read gets an error line,
the others are still read, and the exit code is 1; only regular files are opened (a named pipe
or a device would block or never end). A blank image reads as "".

Paths are printed so that every line stays `path<TAB>digits` (or `path: error: ...` on stderr)
whatever the file is called: a backslash is doubled; tab, newline and carriage return become
\t, \n and \r; any other control byte, and any byte that is not part of valid UTF-8, becomes
\xNN (its value in hex); everything else is printed as it is, in UTF-8. Under --jsonl, "path"
is the name as Python decodes it: JSON escapes what needs escaping, and a byte that is not
UTF-8 appears as \udcNN, which os.fsencode turns back into the byte NN.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from canvas import BLANK_INK_LEVEL, to_canvas
from checkpoint import CheckpointError
from files import CommandLine
from model import DigitSequenceTransformer
from reader import MAX_BATCH_SIZE, Ensemble, add_reader_options, check_reader_options, load_reader

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused (decompression-bomb guard)


def open_image(path: str | Path | BinaryIO) -> Image.Image:
    """Open and fully decode an image file (or file object), refusing oversized and empty ones;
    raises ValueError with the reason."""
    try:
        with warnings.catch_warnings():
            # Pillow warns of damaged metadata (EXIF, TIFF tags) that it skips: the image is read or
            # refused all the same, and a warning would add lines of its own to the file's one line.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if 0 < width * height <= MAX_IMAGE_PIXELS:
                    image.info["frames"] = getattr(image, "n_frames", 1)  # an animation or a multi-page file
                    image.load()
                    ImageOps.exif_transpose(image, in_place=True)  # a copy would double a large image's memory
                    return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # too big for Pillow itself
        raise ValueError(f"image is over the {MAX_IMAGE_PIXELS:,}-pixel limit ({error})") from error
    except UnidentifiedImageError as error:  # Pillow's message names only an in-memory object
        raise ValueError("not an image file that can be read (PNG, JPEG, BMP, GIF, WebP or TIFF)") from error
    except Exception as error:  # on a malformed file Pillow's decoders raise all kinds of exception, not only OSError
        raise ValueError(f"cannot read image ({type(error).__name__}: {' '.join(str(error).split())})") from error
    if width * height == 0:
        raise ValueError(f"image is {width}x{height}: it has no pixels")
    raise ValueError(f"image is {width}x{height}, over the {MAX_IMAGE_PIXELS:,}-pixel limit")


@dataclass
class Reading:
    digits: str
    digit_probs: list[float]
    confidence: float  # calibrated probability of the whole reading: its digits, and that nothing else is written
    too_many: bool = False  # more digits are written than the model reads: digits holds the first of them
    unsure: bool = False  # confidence is below the threshold: the reading is likely to be wrong
    # When unsure: the most probable readings, this one among them, as (digits, too_many, probability).
    alternatives: list[tuple[str, bool, float]] = field(default_factory=list)
    attention: np.ndarray | None = None  # (len(digits), H, W) in [0, 1]: where the model looked for each digit


def read_canvases(
    model: DigitSequenceTransformer | Ensemble,
    canvases: list[np.ndarray],
    *,
    beam_size: int = 1,
    attention: bool = False,
    min_confidence: float | None = None,
    alternatives: int = 3,
) -> list[Reading]:
    """Batch of model-canvas images -> readings (with attention: where the model looked for each
    digit, spread over the canvas's pixels). A reading whose confidence is below min_confidence
    (default: the threshold the checkpoint was calibrated with) is unsure, and gets the
    `alternatives` most probable readings by beam search. A canvas with no ink is read as ""
    without asking the model: there is nothing to read, and a guess would only be a confident error."""
    threshold = model.calibration.min_confidence if min_confidence is None else min_confidence
    readings = [Reading("", [], 1.0) for _ in canvases]  # the blank ones' readings; the others are replaced
    todo = [i for i, canvas in enumerate(canvases) if canvas.max() >= BLANK_INK_LEVEL]
    if not todo:
        return readings
    batch = torch.from_numpy(np.stack([canvases[i] for i in todo]))
    decoded = model.read(batch, beam_size=beam_size, attention=attention)
    maps = None
    if attention:  # each patch's weight spread over its pixels
        maps = F.interpolate(decoded.attention, size=canvases[todo[0]].shape, mode="nearest").cpu().numpy()
    confidences = decoded.confidence().tolist()
    for row, (i, digits, probs, too_many) in enumerate(
        zip(todo, decoded.strings(), decoded.digit_probs(), decoded.too_many())
    ):
        readings[i] = Reading(
            digits,
            probs,
            confidences[row],
            too_many=too_many,
            unsure=confidences[row] < threshold,
            attention=None if maps is None else maps[row, : len(digits)],
        )
    unsure = [row for row, i in enumerate(todo) if readings[i].unsure]
    if unsure and alternatives > 1:
        beams = model.read(batch[unsure], beam_size=alternatives).beams or []
        for row, options in zip(unsure, beams):
            r = readings[todo[row]]
            # The reading itself is one of the alternatives, even where greedy and beam search differ.
            if all((digits, many) != (r.digits, r.too_many) for digits, many, _ in options):
                itself = (r.digits, r.too_many, r.confidence)
                options = sorted([*options[: alternatives - 1], itself], key=lambda option: -option[2])
            r.alternatives = options[:alternatives]
    return readings


def expand_paths(paths: list[str]) -> list[Path]:
    """Files as given; folders replaced by the image files directly inside them, sorted."""
    out = []
    for p in map(Path, paths):
        if os.path.isdir(p):  # False also for a name too long to look up, say: reading it as a file says why
            out += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def check_regular_file(path: Path) -> None:
    """Raise ValueError unless path is a regular file (symbolic links followed): opening a named
    pipe blocks until something writes to it, and a device such as /dev/zero never ends."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError("no such file") from None
    except OSError as error:
        raise ValueError(f"cannot read file ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ValueError("not a regular file")


_UNPRINTABLE = re.compile(rb"[\x00-\x1f\x7f\\]")
_NAMED_ESCAPES = {b"\\": b"\\\\", b"\t": b"\\t", b"\n": b"\\n", b"\r": b"\\r"}


def printable(path: str | Path) -> str:
    """The path as one line of text, escaped as the module's docstring says: its bytes (as the
    file system has them) with control bytes and backslashes escaped first, then decoded as UTF-8
    with every byte that is not part of valid UTF-8 written \\xNN. UTF-8 never uses bytes below
    0x80 inside a multi-byte character, so the first step cannot split one."""
    escaped = _UNPRINTABLE.sub(lambda m: _NAMED_ESCAPES.get(m[0], b"\\x%02x" % m[0][0]), os.fsencode(path))
    return escaped.decode("utf-8", "backslashreplace")


def main(argv: list[str] | None = None) -> int:
    parser = CommandLine(__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    add_reader_options(parser)
    parser.add_argument("--jsonl", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--min-confidence",
        type=float,
        help="readings less sure than this are marked unsure (default: the threshold stored in the checkpoint, "
        "chosen on validation)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    parser.check_range("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)
    if args.min_confidence is not None:
        parser.check_range("--min-confidence", args.min_confidence, 0, 1)
    check_reader_options(parser, args)
    try:
        model = load_reader(args.checkpoint, args.device, args.precision, tta=args.tta, ensemble=args.ensemble)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    paths = expand_paths(args.images)
    if not paths:
        print("error: no image files found in " + ", ".join(map(printable, args.images)), file=sys.stderr)
        return 1
    failed = False
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start : start + args.batch_size]
        failed |= read_files(
            model, batch, beam_size=args.beam_size, jsonl=args.jsonl, min_confidence=args.min_confidence
        )
    return 1 if failed else 0


def reading_record(path: Path, r: Reading) -> dict:
    """The JSON line of one reading."""
    record = {
        "path": str(path),
        "digits": r.digits,
        "too_many": r.too_many,
        "unsure": r.unsure,
        "confidence": round(r.confidence, 6),
        "digit_probs": [round(p, 6) for p in r.digit_probs],
    }
    if r.alternatives:
        record["alternatives"] = [
            {"digits": digits, "too_many": too_many, "confidence": round(p, 6)}
            for digits, too_many, p in r.alternatives
        ]
    return record


def read_files(
    model: DigitSequenceTransformer | Ensemble,
    paths: list[Path],
    *,
    beam_size: int,
    jsonl: bool,
    min_confidence: float | None = None,
) -> bool:
    """Read a batch of image files and print a line for each, in the order given; True if any
    file could not be read (its line is an error, on stderr too)."""
    canvases: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            check_regular_file(path)
            image = open_image(path)
            if (frames := image.info["frames"]) > 1:
                print(f"{printable(path)}: note: {frames} frames or pages, the first read", file=sys.stderr)
            canvases[i] = to_canvas(image, model.config.image_size)
        except ValueError as error:
            errors[i] = str(error)
    read = read_canvases(model, list(canvases.values()), beam_size=beam_size, min_confidence=min_confidence)
    readings = dict(zip(canvases, read))
    for i, path in enumerate(paths):
        if i in errors:
            if jsonl:
                print(json.dumps({"path": str(path), "error": errors[i]}), flush=True)
            print(f"{printable(path)}: error: {errors[i]}", file=sys.stderr)
        elif jsonl:
            print(json.dumps(reading_record(path, readings[i])))
        else:
            r = readings[i]
            print(f"{printable(path)}\t{r.digits}{'+' if r.too_many else ''}{'?' if r.unsure else ''}")
    return bool(errors)


if __name__ == "__main__":
    sys.exit(main())
