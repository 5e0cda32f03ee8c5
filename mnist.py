"""MNIST's four raw idx files under MNIST_ROOT (or --mnist-root): found, checked, read or downloaded by load_mnist."""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

DIGIT_SIZE = 28  # MNIST digits are 28x28
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_COUNTS = {"train": 60_000, "test": 10_000}  # digits in each MNIST split
IDX_MAGIC = {"images": 2051, "labels": 2049}  # idx headers: unsigned bytes in 3 and in 1 dimensions


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
    """MNIST images (N, 28, 28) uint8 and labels (N,) int64 from root/MNIST/raw, missing files
    downloaded first (torchvision also extracts .gz copies found there). Files that are not one
    MNIST split are refused (check_mnist_files) rather than giving digits wrong labels."""
    files = mnist_files(root, train=train)
    if not all(path.is_file() for path in files.values()):
        check_gz_copies([path for path in files.values() if not path.is_file()])
        download_mnist(root, train=train)
    check_mnist_files(root, train=train)
    images = np.fromfile(files["images"], dtype=np.uint8, offset=16).reshape(-1, DIGIT_SIZE, DIGIT_SIZE)
    labels = np.fromfile(files["labels"], dtype=np.uint8, offset=8).astype(np.int64)
    if labels.max() > 9:
        raise MnistUnavailableError(
            f"{files['labels']} holds labels up to {labels.max()}, MNIST's are 0-9: restore the original file"
        )
    return images, labels


def check_gz_copies(missing: list[Path]) -> None:
    """Raise MnistUnavailableError naming a .gz copy of a missing file that cannot be unpacked
    (cut short, not gzip): torchvision would unpack it, fail, and blame the network."""
    for path in missing:
        packed = path.with_name(path.name + ".gz")
        if packed.is_file():
            try:
                with gzip.open(packed) as file:
                    while file.read(1 << 20):
                        pass
            except (OSError, EOFError) as error:
                raise MnistUnavailableError(
                    f"{packed} cannot be unpacked ({error or type(error).__name__}): the file is cut short or "
                    "damaged; restore the original file, or delete it to download MNIST again"
                ) from None


def download_mnist(root: str | Path, *, train: bool) -> None:
    # torchvision is imported here, not above: its import takes seconds (it pulls in torch._dynamo),
    # and every process that composes imports this file.
    import torchvision

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
