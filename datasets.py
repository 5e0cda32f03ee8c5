"""Composites on disk and as torch Datasets.

A dataset folder (write_dataset, read_dataset) holds images.npy, labels.json, metadata.json and
a preview. Training reads composites four ways, each item shaped by dataset_item:
FreshComposites composes new ones as they are asked for, EpochInMemory the same ones an epoch at a
time before it is trained on (a CPU's default), CachedComposites reads them from epochs composed
ahead into a cache, MultiDigitFolder reads a dataset folder (validation and test).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import reprlib
import signal
import string
import typing
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from files import Staging, locked, read_json

if typing.TYPE_CHECKING:
    from multidigit_generator import Composite, MultiDigitComposer


COMPOSITE_LAYOUTS = ("scatter", "row", "marks")  # what a composite is: "marks" holds no digits, only other marks
DATASET_FILES = ("images.npy", "labels.json", "metadata.json", "preview.png")  # a dataset folder, as written


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
    epochs, where KEY (composites_key) digests all that shapes the data, the code and libraries that
    draw it included: an older cache must not serve what today's code would draw differently."""

    def __init__(self, fresh: FreshComposites, root: str | Path):
        self.fresh = fresh
        self.folder = Path(root) / composites_key(fresh)
        self.opened: tuple[int, MultiDigitFolder] | None = None  # (epoch, its folder), opened by the process reading

    def epoch_folder(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch + 1:03d}"

    def missing(self, epochs: range | list[int]) -> list[int]:
        return [e for e in epochs if not self.holds(e)]

    def holds(self, epoch: int) -> bool:
        """Whether the epoch's folder holds that epoch whole: written whole (Staging), it can still
        have been damaged, emptied or swapped with another since, and is then composed again."""
        try:
            images, records, metadata = read_dataset(self.epoch_folder(epoch))
        except (OSError, ValueError):  # missing, cut short, not a dataset folder
            return False
        whole = len(images) == len(records) == len(self.fresh)
        return whole and metadata.get("epoch") == epoch + 1 and metadata.get("seed") == self.fresh.seed

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
        for epoch in missing:
            if progress and self.epoch_folder(epoch).exists():
                print(f"{self.epoch_folder(epoch)} does not hold epoch {epoch + 1} whole: composing it again")
        pending = [(epoch, False) for epoch in missing]  # (epoch, whether to wait for its lock)
        with tqdm(total=len(missing) * len(self), desc="composing epochs", unit="img", disable=not progress) as bar:
            while pending and not stopped():
                epoch, wait = pending.pop(0)
                with self.epoch_lock(epoch, wait) as lock:
                    if lock is None:  # another process is composing it: come back to it last, and wait then
                        pending.append((epoch, True))
                    elif self.holds(epoch):  # the lock's last holder wrote it
                        bar.update(len(self))
                    else:
                        self.compose_epoch(epoch, workers, bar, stopped)

    def epoch_lock(self, epoch: int, wait: bool) -> typing.ContextManager[typing.IO[str] | None]:
        """files.locked on one epoch's lock file: the open file, or None where another process holds it."""
        return locked(self.folder / f".epoch-{epoch + 1:03d}.lock", wait=wait)

    def compose_epoch(self, epoch: int, workers: int, bar: tqdm, stopped: Callable[[], bool]) -> None:
        composites = composed_epoch(self.fresh, epoch, workers, bar, stopped)
        if composites is None:
            return
        composer = self.fresh.composer
        settings = dict(seed=self.fresh.seed, images_per_epoch=len(self.fresh), composer=composer.settings())
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


class EpochInMemory(Dataset):
    """The items of a FreshComposites, each epoch composed whole by worker processes (compose) before
    it is trained on, then held in memory: the same items, composed by every core, and no worker
    takes a core from the training threads while they train (docs/performance.md)."""

    def __init__(self, fresh: FreshComposites):
        self.fresh, self.epoch, self.items = fresh, None, []

    def compose(
        self, epoch: int, workers: int, progress: bool = True, stopped: Callable[[], bool] = lambda: False
    ) -> None:
        """Compose the epoch, unless it is the one held already, until stopped() says to stop."""
        if epoch == self.epoch:
            return
        self.epoch, self.items = None, []  # the memory of the epoch before is free for this one
        with tqdm(total=len(self), desc="composing epochs", unit="img", disable=not progress) as bar:
            composites = composed_epoch(self.fresh, epoch, workers, bar, stopped)
        if composites is not None:
            most = self.fresh.composer.most_digits
            self.items = [dataset_item(c.image, c.label, c.layout, c.boxes, most) for c in composites]
            self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            raise RuntimeError(f"epoch {epoch + 1} is not composed: compose it first (EpochInMemory.compose)")
        self.fresh.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.fresh)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str, torch.Tensor]:
        return self.items[index]


def composed_epoch(
    fresh: FreshComposites, epoch: int, workers: int, bar: tqdm, stopped: Callable[[], bool]
) -> list[Composite] | None:
    """Every composite of one epoch of fresh, in index order, composed by workers processes (0: here);
    None if stopped() said to stop first."""
    fresh = copy.copy(fresh)
    fresh.set_epoch(epoch)
    # The workers compose in the batching step (collate_fn), so each hands back whole Composites,
    # in index order. A generator of its own keeps the loader from drawing on torch's, which
    # training's dropout draws on.
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
            return None
        composites += batch
        bar.update(len(batch))
    return composites


def leave_ctrl_c_to_the_parent(worker_id: int) -> None:
    """A composing worker ignores Ctrl-C, which a terminal sends its whole process group: the
    process that started it decides when to stop, between batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def composites_key(fresh: FreshComposites) -> str:
    """A digest of all that decides a FreshComposites' data: settings, digit pool, seed, size, code, libraries."""
    composer = fresh.composer
    digest = hashlib.sha256()
    for code in (*composer.drawing_code, Path(__file__)):  # how composites are drawn, and how they are kept
        digest.update(code.read_bytes())
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
        if problem := record_problem(record):
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
