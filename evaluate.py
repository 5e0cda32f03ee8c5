"""Score a checkpoint on dataset folders and write a report for each.

    uv run python evaluate.py data/test                                  # reports/test/
    uv run python evaluate.py data/val data/test --beam-size 4 --checkpoint runs/default/model.pt

For each dataset folder (written by multidigit_generator.py or split_multidigit_dataset.py),
OUT/<folder name>/ gets
  report.json           exact and order-free accuracy overall, per layout and per length,
                        digit-level error counts, the confusion matrix, images/s, and the
                        confidence's calibration: expected calibration error, coverage and
                        accuracy at the checkpoint's unsure threshold
An image holding more digits than the model reads counts as right when the model says so
(too_many); its digits are not scored.
  report.md             the same as tables
  confusion_matrix.png  true digit against read digit, from an edit-distance alignment
  failures.png          the misread images, most confident first
  calibration.png       reliability diagram: accuracy against confidence
and a summary table is printed. The model itself is scored, as training does: unlike
predict.py, a blank canvas is read by the model too rather than answered "" without it, and
the images go straight into the model; --as-files reads them as predict.py reads a file.
A folder that is not a dataset, or whose report cannot be written, is reported and skipped
(exit code 1); a missing or unusable checkpoint, or a report folder that holds other files,
stops everything before any work (exit code 2).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from canvas import BLANK_INK_LEVEL, to_canvas
from checkpoint import CheckpointError
from datasets import preview_sheet, read_dataset
from files import CommandLine, Staging, check_destination, markdown_table
from model import NO_DIGIT, PAD, VOCAB_SIZE, Calibration, DigitSequenceTransformer, decoder_inputs, uint8_to_input
from multidigit_generator import LAYOUTS
from reader import MAX_BATCH_SIZE, Ensemble, add_reader_options, check_reader_options, load_reader

MATRIX_LABELS = [str(d) for d in range(10)] + ["none"]
IMAGE_ARROW = "->"  # PIL's built-in font has no arrow glyph, so pictures say "->" where text says "→"
MAX_GALLERY_SIZE = 1000  # misread images drawn in failures.png at most: the picture grows with them
REPORT_FILES = ("report.json", "report.md", "confusion_matrix.png", "failures.png", "calibration.png")
TOO_MANY_MARK = "+"  # how scores write "more digits than the model reads", on both sides: see as_read, as_expected
CALIBRATION_BINS = 15  # equal-width confidence bins of the expected calibration error and its picture
TARGET_ACCEPTED_ACCURACY = 0.998  # the unsure threshold keeps at least this share of accepted readings right
TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))  # the grid fit_calibration searches


class SequenceAccuracy:
    """Share of decoded strings that are right, overall, per layout and per length (keys
    "all", "row", "scatter", "len0", ...), counted two ways: exact match (every digit in its
    place) and order-free (the same digits in any order: sorted(prediction) == sorted(label)),
    which is all that a model trained to read the digits in any order promises."""

    def __init__(self) -> None:
        self.exact: dict[str, int] = defaultdict(int)
        self.order_free: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)

    def update(self, predictions: list[str], labels: list[str], layouts: list[str]) -> None:
        """Count readings against labels as scores write them (as_read, as_expected): an image with
        more digits than the model reads is counted under "too_many", not under a length."""
        for prediction, label, layout in zip(predictions, labels, layouts, strict=True):
            for key in ("all", layout, "too_many" if label == TOO_MANY_MARK else f"len{len(label)}"):
                self.exact[key] += prediction == label
                self.order_free[key] += sorted(prediction) == sorted(label)
                self.total[key] += 1

    def compute(self, *, order_free: bool = False) -> dict[str, float]:
        correct = self.order_free if order_free else self.exact
        return {key: correct[key] / self.total[key] for key in sorted(self.total)}


def report_keys(keys: list[str] | set[str]) -> list[str]:
    """The keys of a SequenceAccuracy in reading order: all, then layouts, then lengths."""
    layouts = sorted(
        (k for k in keys if k not in ("all", "too_many") and not k.startswith("len")),
        key=lambda k: (LAYOUTS.index(k) if k in LAYOUTS else len(LAYOUTS), k),
    )
    lengths = sorted((k for k in keys if k.startswith("len")), key=lambda k: int(k[3:]))
    return ["all"] * ("all" in keys) + layouts + lengths + ["too_many"] * ("too_many" in keys)


def align_digits(prediction: str, truth: str) -> list[tuple[str | None, str | None]]:
    """Pair the digits of a reading with those of the truth by minimum edit distance
    (Levenshtein, every edit costing 1), in reading order: (true, read) for a match or a
    substitution, (true, None) for a missed digit, (None, read) for an extra one. Where two
    alignments cost the same, substitutions win: "12" read as "21" is 1->2 and 2->1."""
    n, m = len(truth), len(prediction)
    cost = np.zeros((n + 1, m + 1), dtype=np.int64)
    cost[:, 0], cost[0, :] = np.arange(n + 1), np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i, j] = min(
                cost[i - 1, j - 1] + (truth[i - 1] != prediction[j - 1]), cost[i - 1, j] + 1, cost[i, j - 1] + 1
            )
    pairs: list[tuple[str | None, str | None]] = []
    i, j = n, m
    while i or j:
        if i and j and cost[i, j] == cost[i - 1, j - 1] + (truth[i - 1] != prediction[j - 1]):
            pairs.append((truth[i - 1], prediction[j - 1]))
            i, j = i - 1, j - 1
        elif i and cost[i, j] == cost[i - 1, j] + 1:
            pairs.append((truth[i - 1], None))
            i -= 1
        else:
            pairs.append((None, prediction[j - 1]))
            j -= 1
    return pairs[::-1]


def confusion_matrix(predictions: list[str], labels: list[str]) -> np.ndarray:
    """(11, 11) counts: row = true digit, column = read digit, both 0-9 then "none" (index
    NO_DIGIT). A missed digit counts in the "none" column, an extra digit in the "none" row."""
    matrix = np.zeros((NO_DIGIT + 1, NO_DIGIT + 1), dtype=np.int64)
    for prediction, label in zip(predictions, labels, strict=True):
        for true, read in align_digits(prediction, label):
            matrix[NO_DIGIT if true is None else int(true), NO_DIGIT if read is None else int(read)] += 1
    return matrix


def digit_counts(matrix: np.ndarray) -> dict[str, int]:
    digits = matrix[:NO_DIGIT, :NO_DIGIT]
    return {
        "true_digits": int(matrix[:NO_DIGIT].sum()),
        "correct": int(np.trace(digits)),
        "substitutions": int(digits.sum() - np.trace(digits)),
        "missed": int(matrix[:NO_DIGIT, NO_DIGIT].sum()),
        "extra": int(matrix[NO_DIGIT, :NO_DIGIT].sum()),
    }


def most_confused(matrix: np.ndarray) -> tuple[str, str, int] | None:
    """(true digit, read digit, count) of the commonest substitution, or None when no digit was
    read as another; missed and extra digits are counted apart (digit_counts)."""
    errors = matrix[:NO_DIGIT, :NO_DIGIT].copy()
    np.fill_diagonal(errors, 0)
    true, read = np.unravel_index(errors.argmax(), errors.shape)
    return (str(true), str(read), int(errors[true, read])) if errors[true, read] else None


def _mix(colour: tuple[int, int, int], share: float) -> tuple[int, ...]:
    """White blended towards colour by share in [0, 1]."""
    return tuple(round(255 + (c - 255) * share) for c in colour)


def confusion_matrix_image(matrix: np.ndarray, title: str, cell: int = 44) -> Image.Image:
    """The matrix as a heat map with every non-zero count written in its cell. Correct digits
    (the diagonal) are shaded blue on their own scale and errors red on theirs, so that a few
    hundred correct readings per digit do not bleach out the errors that matter; square roots
    keep single errors visible next to the largest."""
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    size = len(MATRIX_LABELS)
    left, top, bottom = 56, 64, 44
    image = Image.new("RGB", (left + size * cell + 8, top + size * cell + bottom), "white")
    draw = ImageDraw.Draw(image)
    draw.text((image.width // 2, 14), title, fill="black", font=font, anchor="mm")
    draw.text((left + size * cell // 2, 34), "read", fill="black", font=small, anchor="mm")
    draw.text((left // 2, top - 12), "true", fill="black", font=small, anchor="mm")
    diagonal = np.eye(size, dtype=bool)
    scale = {True: max(1, int(matrix[diagonal].max())), False: max(1, int(matrix[~diagonal].max()))}
    for k, name in enumerate(MATRIX_LABELS):
        draw.text((left + k * cell + cell // 2, top - 12), name, fill="black", font=small, anchor="mm")
        draw.text((left - 8, top + k * cell + cell // 2), name, fill="black", font=small, anchor="rm")
    for (row, col), count in np.ndenumerate(matrix):
        share = (count / scale[row == col]) ** 0.5
        colour = _mix((40, 90, 200) if row == col else (210, 30, 30), share)
        x, y = left + col * cell, top + row * cell
        draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=(225, 225, 225))
        if count:
            ink = "white" if share > 0.6 else "black"
            draw.text((x + cell // 2, y + cell // 2), str(count), fill=ink, font=small, anchor="mm")
    edge = top + NO_DIGIT * cell  # set the "none" row and column apart from the digits
    draw.line((left, edge, left + size * cell, edge), fill="black")
    draw.line((left + NO_DIGIT * cell, top, left + NO_DIGIT * cell, top + size * cell), fill="black")
    legend = (
        "blue: correct digits, red: errors (each on its own scale)\n"
        "none column: a missed digit, none row: an extra digit"
    )
    draw.multiline_text((left, top + size * cell + 8), legend, fill=(90, 90, 90), font=small, spacing=4)
    return image


def worst_failures(predictions: list[str], labels: list[str], confidences: list[float], limit: int) -> list[int]:
    """Indices of the misread images (not an exact match), most confident first, at most limit."""
    wrong = [i for i, (p, t) in enumerate(zip(predictions, labels, strict=True)) if p != t]
    return sorted(wrong, key=lambda i: -confidences[i])[:limit]


def _with_title(image: Image.Image, title: str) -> Image.Image:
    font = ImageFont.load_default(size=16)
    width = max(image.width, round(font.getlength(title)) + 20)
    out = Image.new("RGB", (width, image.height + 32), "white")
    out.paste(image, (0, 32))
    ImageDraw.Draw(out).text((10, 16), title, fill="black", font=font, anchor="lm")
    return out


def failure_gallery(
    images: np.ndarray, predictions: list[str], labels: list[str], confidences: list[float], *, limit: int, title: str
) -> Image.Image:
    """A preview sheet of the misread images, most confident first, each captioned
    "truth -> reading confidence"; with no misreadings, a picture that says so."""
    wrong = sum(p != t for p, t in zip(predictions, labels))
    if not wrong:
        blank = Image.new("RGB", (400, 1), "white")
        return _with_title(blank, f"{title}: no failures, all {len(labels)} images read exactly")
    worst = worst_failures(predictions, labels, confidences, limit)
    captions = [f"{labels[i] or '-'} {IMAGE_ARROW} {predictions[i] or '-'}  {confidences[i]:.0%}" for i in worst]
    sheet = preview_sheet([np.asarray(images[i]) for i in worst], captions)
    shown = f"the {len(worst)} most confident" if len(worst) < wrong else "all"
    heading = (
        f"{title}: {wrong} of {len(labels)} images misread; {shown} shown, truth {IMAGE_ARROW} reading, confidence"
    )
    return _with_title(sheet, heading)


def as_read(digits: str, too_many: bool) -> str:
    """A reading as scored: its digits, or TOO_MANY_MARK when it said there are more than it reads."""
    return TOO_MANY_MARK if too_many else digits


def as_expected(label: str, max_digits: int) -> str:
    """The reading a label asks for: the label, or TOO_MANY_MARK when it holds more than max_digits."""
    return TOO_MANY_MARK if len(label) > max_digits else label


@dataclass
class Readings:
    digits: list[str]
    too_many: list[bool]
    confidences: list[float]  # calibrated probability of each whole reading
    seconds: float

    @property
    def scored(self) -> list[str]:
        return [as_read(d, t) for d, t in zip(self.digits, self.too_many)]


def read_images(
    model: DigitSequenceTransformer | Ensemble,
    images: np.ndarray,
    *,
    beam_size: int = 1,
    batch_size: int = 256,
    desc: str = "reading",
    as_files: bool = False,
) -> Readings:
    """Read (N, H, W) uint8 canvases in batches. as_files reads them as predict.py and the front
    end read an image file: through to_canvas, and a canvas left with no ink is "" without the model."""
    readings = Readings([], [], [], 0.0)
    started = time.perf_counter()
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch = np.array(images[start : start + batch_size])
        if as_files:
            batch = np.stack([to_canvas(Image.fromarray(image), model.config.image_size) for image in batch])
        decoded = model.read(torch.from_numpy(batch), beam_size=beam_size)
        blank = [bool(image.max() < BLANK_INK_LEVEL) and as_files for image in batch]
        readings.digits += ["" if b else d for b, d in zip(blank, decoded.strings())]
        readings.too_many += [t and not b for b, t in zip(blank, decoded.too_many())]
        readings.confidences += [1.0 if b else c for b, c in zip(blank, decoded.confidence().tolist())]
    readings.seconds = time.perf_counter() - started
    return readings


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = CALIBRATION_BINS) -> float:
    """The mean gap between confidence and accuracy over equal-width confidence bins, each bin
    weighted by its share of the readings: 0 when a reading said to be p sure is right p of the time."""
    conf, right = np.asarray(confidences, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    held = np.unique(which[which >= 0])  # the bins holding readings (a NaN confidence falls in none)
    gaps = [abs(conf[which == b].mean() - right[which == b].mean()) * (which == b).mean() for b in held]
    return float(sum(gaps))


def accepted_readings(confidences: list[float], correct: list[bool], threshold: float) -> dict:
    """Coverage (share of readings at or above threshold) and the accuracy of those accepted."""
    conf, right = np.asarray(confidences), np.asarray(correct, dtype=bool)
    accepted = conf >= threshold
    return {
        "threshold": threshold,
        "coverage": float(accepted.mean()),
        "accepted_accuracy": float(right[accepted].mean()) if accepted.any() else None,
    }


@torch.inference_mode()
def greedy_logits(
    model: DigitSequenceTransformer, images: np.ndarray, labels: list[str], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """The greedy readings of the images: each step's logits and token (padded to max_tokens with
    PAD) and whether the reading is right, for recomputing its probability at any temperature."""
    logits, tokens, correct = [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc="calibrating", unit="batch", leave=False):
        batch = torch.from_numpy(np.array(images[start : start + batch_size])).to(next(model.parameters()).device)
        memory = model.encode(uint8_to_input(batch))
        decoded = model.greedy_decode(memory)
        read = [as_read(d, t) for d, t in zip(decoded.strings(), decoded.too_many())]
        expected = [as_expected(label, model.config.max_digits) for label in labels[start : start + batch_size]]
        correct += [r == e for r, e in zip(read, expected)]
        inputs = decoder_inputs(decoded.tokens)
        logits.append(F.pad(model.decode(memory, inputs).float(), (0, 0, 0, model.config.max_tokens - inputs.shape[1])))
        tokens.append(F.pad(decoded.tokens, (0, model.config.max_tokens - inputs.shape[1]), value=PAD))
    return torch.cat(logits), torch.cat(tokens), correct


def fit_calibration(
    model: DigitSequenceTransformer,
    images: np.ndarray,
    labels: list[str],
    *,
    composed_as_in_training: tuple[np.ndarray, list[str]] | None = None,
    batch_size: int = 256,
    target: float = TARGET_ACCEPTED_ACCURACY,
) -> Calibration:
    """The temperature and unsure threshold for a trained model, from its readings of held-out
    images (validation) and, if given, of `composed_as_in_training` ones (validation digits composed as training
    composes them: pen strokes, noisy paper, marks). Greedy readings do not depend on the
    temperature (dividing the logits keeps their order), so the images are read once and only the
    readings' probabilities are recomputed for each temperature of a grid: the one that best
    predicts which readings are right over both sets (least log-loss of confidence against
    correctness) is kept, so that confidence means the same on clean and on harder images. The
    threshold is the lowest confidence at which the clean readings at or above it are still
    `target` right."""
    model.calibration = Calibration()
    clean = len(images)
    if composed_as_in_training is not None:
        images, labels = np.concatenate([images, composed_as_in_training[0]]), [*labels, *composed_as_in_training[1]]
    all_logits, all_tokens, correct = greedy_logits(model, images, labels, batch_size)
    right = torch.tensor(correct, dtype=torch.float64)
    real = all_tokens != PAD

    def confidences(temperature: float) -> torch.Tensor:
        model.calibration = Calibration(temperature=temperature)
        log_probs = model.token_log_probs(all_logits).gather(2, all_tokens.clamp(max=VOCAB_SIZE - 1)[..., None])[..., 0]
        return log_probs.masked_fill(~real, 0.0).sum(dim=1).double().exp()

    def log_loss(temperature: float) -> float:
        p = confidences(temperature).clamp(1e-9, 1 - 1e-9)
        return float(-(right * p.log() + (1 - right) * (1 - p).log()).mean())

    temperature = float(min(TEMPERATURES, key=log_loss))
    conf, right = confidences(temperature)[:clean], right[:clean]
    order = torch.argsort(conf, descending=True)
    accuracy_of_top = right[order].cumsum(0) / torch.arange(1, len(order) + 1)
    good = (accuracy_of_top >= target).nonzero()
    # The most readings that can be accepted at the target; none if even the surest one is wrong.
    threshold = float(conf[order[int(good.max())]]) if len(good) else 1.0
    model.calibration = Calibration(temperature=temperature, min_confidence=min(1.0, threshold))
    return model.calibration


def calibration_image(
    confidences: list[float], correct: list[bool], title: str, bins: int = CALIBRATION_BINS
) -> Image.Image:
    """A reliability diagram: for each confidence bin, a bar as high as the accuracy of the
    readings in it (its width shaded by how many there are), against the diagonal of a model
    whose confidence is exactly its accuracy."""
    size, left, top, right, bottom = 360, 64, 36, 20, 48
    out = Image.new("RGB", (left + size + right, top + size + bottom), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=13)
    conf, hits = np.asarray(confidences), np.asarray(correct, dtype=np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    width = size / bins
    for b in np.unique(which[which >= 0]):  # the bins holding readings
        members = which == b
        bar_top = top + size * (1 - hits[members].mean())
        shade = _mix((31, 119, 180), 0.25 + 0.75 * min(1.0, members.mean() * bins))
        draw.rectangle((left + b * width + 1, bar_top, left + (b + 1) * width - 1, top + size), fill=shade)
    draw.line((left, top + size, left + size, top), fill=(200, 60, 60), width=2)
    draw.rectangle((left, top, left + size, top + size), outline="black")
    for tick in np.linspace(0, 1, 6):  # the same values on both axes
        x, y = left + tick * size, top + size * (1 - tick)
        draw.line((x, top + size, x, top + size + 4), fill="black")
        draw.text((x, top + size + 6), f"{tick:.1f}", fill="black", font=font, anchor="mt")
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((left - 6, y), f"{tick:.1f}", fill="black", font=font, anchor="rm")
    draw.text((left + size / 2, top + size + 26), "confidence", fill="black", font=font, anchor="mt")
    label = Image.new("RGB", (120, 18), "white")
    ImageDraw.Draw(label).text((60, 9), "accuracy", fill="black", font=font, anchor="mm")
    out.paste(label.rotate(90, expand=True), (6, top + size // 2 - 60))
    draw.text((left, top - 18), title, fill="black", font=font, anchor="lm")
    return out


def evaluate_folder(
    model: DigitSequenceTransformer | Ensemble,
    folder: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | Path = "",
    beam_size: int = 1,
    batch_size: int = 256,
    gallery_size: int = 48,
    as_files: bool = False,
) -> dict:
    """Read every image of a dataset folder, write the REPORT_FILES into out_dir, whole or not at
    all, and return the report. FileNotFoundError or ValueError (naming the folder) for a folder
    that is not a dataset or does not fit the model; OSError if the report cannot be written."""
    folder, out_dir = Path(folder), Path(out_dir)
    images, records, metadata = read_dataset(folder)
    size, max_digits = model.config.image_size, model.config.max_digits
    if images.shape[1:] != (size, size):
        raise ValueError(f"{folder} holds {images.shape[1]}x{images.shape[2]} images, the model reads {size}x{size}")
    if not records:
        raise ValueError(f"{folder} holds no images")
    labels, layouts = [r["label"] for r in records], [r["layout"] for r in records]
    readings = read_images(
        model, images, beam_size=beam_size, batch_size=batch_size, desc=folder.name, as_files=as_files
    )
    expected = [as_expected(label, max_digits) for label in labels]
    decoding = "greedy" if beam_size == 1 else f"beam {beam_size}"
    report = {
        "checkpoint": str(checkpoint),
        "dataset": str(folder),
        "metadata": metadata,
        "num_images": len(records),
        "decoding": model.decoding if isinstance(model, Ensemble) else decoding,
        "precision": "bf16" if model.read_bf16["read_batch"] else "fp32",
        "read_as": "files, through to_canvas" if as_files else "canvases, straight into the model",
        "device": str(next(model.parameters()).device),
        "images_per_second": len(records) / readings.seconds,
        **score(readings, expected, layouts, min_confidence=model.calibration.min_confidence),
    }
    pictures = report_pictures(report, images, readings, expected, title=folder.name, gallery_size=gallery_size)
    with Staging() as staging:  # a report is written whole or not at all, an older one replaced only then
        written = staging.folder(out_dir, REPORT_FILES)
        (written / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (written / "report.md").write_text(report_markdown(report))
        for name, picture in pictures.items():
            picture.save(written / name)
    return report


def report_pictures(
    report: dict, images: np.ndarray, readings: Readings, expected: list[str], *, title: str, gallery_size: int
) -> dict[str, Image.Image]:
    """The report's pictures by file name: the confusion matrix, the failures, the reliability diagram."""
    confused, confused_text = report["most_confused"], "no digit read as another"
    if confused:
        confused_text = f"most confused: {confused['true']}{IMAGE_ARROW}{confused['read']} ({confused['count']})"
    matrix = np.array(report["confusion_matrix"]["rows_true_columns_read"])
    correct = [r == e for r, e in zip(readings.scored, expected)]
    calibration_error = report["calibration"]["expected_calibration_error"]
    return {
        "confusion_matrix.png": confusion_matrix_image(matrix, f"{title}: {confused_text}"),
        "failures.png": failure_gallery(
            images, readings.scored, expected, readings.confidences, limit=gallery_size, title=title
        ),
        "calibration.png": calibration_image(
            readings.confidences, correct, f"{title}: expected calibration error {100 * calibration_error:.2f} %"
        ),
    }


def score(readings: Readings, expected: list[str], layouts: list[str], *, min_confidence: float = 0.0) -> dict:
    """The report's numbers: exact and order-free accuracy per subset, digit counts and confusions
    (over the images that do not hold too many digits), and how well the confidence is calibrated
    (expected calibration error; coverage and accuracy of the readings at or above min_confidence,
    the rest being unsure; the share read as nothing or unsure, what non-digit marks should get)."""
    read = readings.scored
    accuracy = SequenceAccuracy()
    accuracy.update(read, expected, layouts)
    countable = [i for i, e in enumerate(expected) if e != TOO_MANY_MARK]
    matrix = confusion_matrix([readings.digits[i] for i in countable], [expected[i] for i in countable])
    confused = most_confused(matrix)
    keys = report_keys(accuracy.total)
    exact, order_free = accuracy.compute(), accuracy.compute(order_free=True)
    correct = [r == e for r, e in zip(read, expected)]
    unsure = [c < min_confidence for c in readings.confidences]
    return {
        "count": {key: accuracy.total[key] for key in keys},
        "exact_accuracy": {key: exact[key] for key in keys},
        "order_free_accuracy": {key: order_free[key] for key in keys},
        "digits": digit_counts(matrix),
        "most_confused": dict(zip(("true", "read", "count"), confused)) if confused else None,
        "confusion_matrix": {"labels": MATRIX_LABELS, "rows_true_columns_read": matrix.tolist()},
        "calibration": {
            "expected_calibration_error": expected_calibration_error(readings.confidences, correct),
            "mean_confidence": float(np.mean(readings.confidences)),
            **accepted_readings(readings.confidences, correct, min_confidence),
            "read_nothing_or_unsure": float(np.mean([r == "" or u for r, u in zip(read, unsure)])),
            "too_many": float(np.mean(readings.too_many)),
        },
    }


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def accuracy_table(report: dict) -> str:
    """Markdown table: one row per subset (all, layouts, lengths), columns n, exact %, order-free %."""
    rows = [
        [key, n, percent(report["exact_accuracy"][key]), percent(report["order_free_accuracy"][key])]
        for key, n in report["count"].items()
    ]
    return markdown_table(["subset", "n", "exact %", "order-free %"], rows, numbers_from=1)


def report_markdown(report: dict) -> str:
    d, c, confused = report["digits"], report["calibration"], report["most_confused"]
    paragraphs = [
        f"# {Path(report['dataset']).name}",
        f"Checkpoint `{report['checkpoint']}`, dataset `{report['dataset']}` ({report['num_images']} images), "
        f"decoding: {report['decoding']}, in {report['precision']} on {report['device']}, "
        f"{report['images_per_second']:.0f} images/s.",
        accuracy_table(report),
        f"Digits: {d['true_digits']} in the labels, {d['correct']} read correctly, {d['substitutions']} substituted, "
        f"{d['missed']} missed, {d['extra']} extra (aligned by edit distance)."
        + (f" Most confused: {confused['true']} → {confused['read']} ({confused['count']})." if confused else ""),
        f"Confidence: expected calibration error {percent(c['expected_calibration_error'])} %; "
        f"at the unsure threshold {c['threshold']:.3f}, {percent(c['coverage'])} % of readings are accepted and "
        f"{percent(c['accepted_accuracy'])} % of those are right; {percent(c['read_nothing_or_unsure'])} % are read "
        f"as nothing or unsure, {percent(c['too_many'])} % as more digits than the model reads.",
        "![confusion matrix](confusion_matrix.png)",
        "![misread images, most confident first](failures.png)",
        "![reliability diagram: accuracy against confidence](calibration.png)",
    ]
    return "\n\n".join(paragraphs) + "\n"


def summary_table(reports: dict[str, dict]) -> str:
    """Markdown table, one row per dataset: its accuracies and how its confidence fares."""
    header = ["dataset", "n", "exact %", "order-free %", "scatter %", "row %", "ECE %", "accepted %"]
    header += ["accepted right %", "nothing or unsure %"]
    rows = []
    for name, r in reports.items():
        exact, c = r["exact_accuracy"], r["calibration"]
        shares = [exact["all"], r["order_free_accuracy"]["all"], exact.get("scatter"), exact.get("row")]
        shares += [c["expected_calibration_error"], c["coverage"], c["accepted_accuracy"], c["read_nothing_or_unsure"]]
        rows.append([name, r["num_images"], *map(percent, shares)])
    return markdown_table(header, rows, numbers_from=1)


def build_parser() -> CommandLine:
    parser = CommandLine(__doc__)
    parser.add_argument("datasets", nargs="+", metavar="DATASET_DIR")
    add_reader_options(parser)
    parser.add_argument("--out", default="reports", help="each dataset's report goes to OUT/<dataset folder name>/")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--gallery-size", type=int, default=48, help="most misread images shown in failures.png")
    parser.add_argument(
        "--as-files",
        action="store_true",
        help="read each image as predict.py and the front end read a file (to_canvas first), not straight to the model",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.check_range("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)
    parser.check_range("--gallery-size", args.gallery_size, 0, MAX_GALLERY_SIZE)
    check_reader_options(parser, args)
    names = [Path(folder).resolve().name for folder in args.datasets]
    if len(set(names)) < len(names):
        parser.error(
            f"dataset folders must have different names, their reports go to {args.out}/<name>: "
            f"got {', '.join(args.datasets)}"
        )
    try:
        for name in names:
            check_destination(Path(args.out) / name, REPORT_FILES)
        Path(args.out).mkdir(parents=True, exist_ok=True)  # made now, so that a folder no one can make fails first
    except ValueError as error:
        parser.error(f"--out: {error}")
    except OSError as error:
        parser.error(f"--out {args.out}: cannot make the folder ({error.strerror or error})")
    try:
        model = load_reader(args.checkpoint, args.device, args.precision, tta=args.tta, ensemble=args.ensemble)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    reports: dict[str, dict] = {}
    for folder, name in zip(args.datasets, names):
        out_dir = Path(args.out) / name
        try:
            report = evaluate_folder(
                model,
                folder,
                out_dir,
                checkpoint=args.checkpoint,
                beam_size=args.beam_size,
                batch_size=args.batch_size,
                gallery_size=args.gallery_size,
                as_files=args.as_files,
            )
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            continue
        except OSError as error:  # an unreadable dataset file, a full disk, ...: no report is left half-written
            print(f"error: evaluating {folder} failed ({error}); no report written to {out_dir}", file=sys.stderr)
            continue
        reports[name] = report
        print(
            f"\n{name}: {report['num_images']} images, decoding: {report['decoding']}, "
            f"{report['images_per_second']:.0f} images/s; report in {out_dir}/\n\n{accuracy_table(report)}"
        )
    if len(reports) > 1:
        print(f"\n{summary_table(reports)}")
    return 0 if len(reports) == len(args.datasets) else 1


if __name__ == "__main__":
    sys.exit(main())
