"""Split MNIST digits into train / validation / test pools, then compose the evaluation sets.

No MNIST digit image appears in two splits:
  train  composites drawn from a random (1 - val_fraction) share of the MNIST training digits
         (composed fresh every epoch by train_encoder_decoder.py, so none are written here)
  val    composites drawn only from the remaining MNIST training digits
  test   composites drawn only from the MNIST test digits

Evaluation composites hold MNIST digits as they were written: each is cut to its ink, scaled to a
height within the digit-height range and placed, but not rotated, sheared or given other strokes
(EVAL_COMPOSER); that per-digit augmentation is for training, and the `augmented` stress set
measures it on its own.

Writes data_dir/splits.json (the digit pools and every setting) and data_dir/val/ and
data_dir/test/ dataset folders (see datasets.write_dataset), all three moved into
place together once all are written: a failed run leaves what was there before. Splitting comes
before generating because composites cannot be split afterwards without sharing digits.

With --stress it writes instead the stress sets, data_dir/stress/<name>/: held-out composites
unlike the training ones (thinner or thicker strokes, digits outside the trained height range,
digits against the edges, stretched digits, scanner artefacts; see STRESS_SETS). They use
MNIST test digits only, so they need no splits.json.

    uv run python split_multidigit_dataset.py --data-dir data
    uv run python split_multidigit_dataset.py --data-dir data --stress
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from augment import ink_box
from datasets import DATASET_FILES, write_dataset_files
from files import CommandLine, Staging, check_destination, file_digest
from mnist import DIGIT_SIZE, MNIST_COUNTS, MnistUnavailableError, load_mnist
from multidigit_generator import (
    Composite,
    MultiDigitComposer,
    add_composer_arguments,
    check_composer_settings,
    check_dataset_size,
    composer_settings,
    generate,
)

SPLITS_FILE = "splits.json"
STRESS_DIR = "stress"
MNIST_DIGITS = "mnist_digits"
MNIST_DIGITS_DESCRIPTION = (
    "each of the 10,000 MNIST test digits alone, its 28x28 image unchanged at the centre of the canvas: "
    "the digits cnn_reference.py's plain CNN reads"
)
STRESS_SEED_OFFSET = 3  # val is composed with seed + 1 and test with seed + 2
# Base settings of every evaluation set (val, test, stress): the digits as written, no augmentation.
EVAL_COMPOSER = dict(augment_strength=0.0)
# name: (composer settings over the base ones, what the stress is). Training composes digits 18-28 px
# high, changes strokes by at most a pixel (thinner ones faded) and keeps rows level, a pixel
# clear of the edges.
STRESS_SETS: dict[str, tuple[dict, str]] = {
    "augmented": (
        dict(augment_strength=1.0),
        "training's per-digit augmentation: rotation up to 12 degrees, shear up to 10, scale 0.9-1.1, "
        "one pixel thinner or thicker strokes on 40 % of digits",
    ),
    "thin": (
        dict(stroke_width_change=-1),
        "every stroke 1 px thinner, as bright as the digit's ink (a 2 px erosion wipes out most MNIST strokes)",
    ),
    "thick": (dict(stroke_width_change=2), "every stroke 2 px thicker"),
    **{f"height_{h}": (dict(digit_height=(h, h)), f"every digit {h} px high") for h in (14, 18, 28, 32)},
    "anywhere": (
        dict(hug_borders=True, row_tilt=10.0),
        "digits against the canvas edges and in its corners; rows at any height, touching any edge, "
        "tilted by up to 10 degrees",
    ),
    "stretched": (
        dict(aspect_stretch=(0.75, 1.3)),
        "every digit's width times 0.75-1.3, other proportions than MNIST's writers",
    ),
    "scanner": (
        dict(scan_degradation=True),
        "Gaussian blur, ink 120-255 on a background of 0-60 (at least 100 apart), noise, JPEG at quality 30-70",
    ),
    "small": (dict(digit_height=(12, 16)), "every digit 12-16 px high"),
    "pen": (
        dict(pen_share=1.0),
        "every digit redrawn along its centre lines with a round pen, hairline to marker, as a drawing pad draws",
    ),
    "noisy": (
        dict(paper_noise=1.0),
        "every composite on imperfect paper: grey, ruled lines, speckles, dust, and half of them scanned badly",
    ),
    "touching": (dict(layout="row", touching_share=1.0), "rows whose neighbouring digits touch or overlap by 0-3 px"),
    "nondigits": (
        dict(nondigit_share=1.0, pen_share=0.5),
        "one to three marks that are not digits (blobs, crosses, hatching, stars, spirals, faces, scribbles, "
        'rules, letters), drawn like MNIST digits, half of them redrawn with a pen: the right reading is ""',
    ),
    "blank_paper": (
        dict(min_digits=0, max_digits=0, length_weights=None, paper_noise=1.0),
        'no digits, only imperfect paper (grey, ruled, speckled, dusty, scanned): the right reading is ""',
    ),
    "overflow": (
        dict(overflow_share=1.0),
        "five or six digits, more than the model reads: the right reading says so (too_many)",
    ),
}


def split_digit_pools(num_train_digits: int, val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Disjoint MNIST-train index pools {"train": [...], "val": [...]}, sorted, by a seeded shuffle."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    order = np.random.default_rng(seed).permutation(num_train_digits)
    num_val = max(1, round(num_train_digits * val_fraction))
    return {"train": sorted(order[num_val:].tolist()), "val": sorted(order[:num_val].tolist())}


def prepare_splits(
    data_dir: str | Path,
    *,
    mnist_root: str | Path,
    val_images: int = 2000,
    test_images: int = 10000,
    val_fraction: float = 0.1,
    seed: int = 0,
    composer: dict | None = None,
) -> dict:
    """Write splits.json, val/ and test/ under data_dir, whole or not at all, and return the splits
    record. Settings and destinations are checked (ValueError) before MNIST is loaded."""
    if val_images < 1 or test_images < 1:
        raise ValueError(f"need at least one validation and one test image, got {val_images} and {test_images}")
    pools = split_digit_pools(MNIST_COUNTS["train"], val_fraction, seed)  # load_mnist checks that count
    composer = {**EVAL_COMPOSER, **(composer or {})}
    check_composer_settings(**composer)
    data_dir = Path(data_dir)
    for name, files in (("val", DATASET_FILES), ("test", DATASET_FILES), (SPLITS_FILE, None)):
        check_destination(data_dir / name, files)
    train_images, train_labels = load_mnist(mnist_root, train=True)
    test_digits, test_labels = load_mnist(mnist_root, train=False)
    pools["test"] = list(range(len(test_digits)))
    sources = {"val": (train_images, train_labels, "train"), "test": (test_digits, test_labels, "test")}
    counts = {"val": val_images, "test": test_images}
    # All three are moved into place together once written, splits.json last: it is there only with
    # the val/ and test/ it describes.
    contents = {}
    with Staging() as staging:
        for offset, split in enumerate(("val", "test"), start=1):
            images, labels, mnist_split = sources[split]
            pool = np.asarray(pools[split])
            split_composer = MultiDigitComposer(images[pool], labels[pool], **composer)
            # Different seeds per split, so val and test are not the same draws from different digits.
            composites = generate(split_composer, counts[split], seed + offset, pool_indices=pool)
            metadata = dict(split_composer.settings(), seed=seed + offset, mnist_split=mnist_split)
            written = staging.folder(data_dir / split, DATASET_FILES)
            write_dataset_files(written, composites, metadata)
            contents[split] = split_digest(written)
        record = dict(
            seed=seed,
            val_fraction=val_fraction,
            val_images=val_images,
            test_images=test_images,
            composer=split_composer.settings(),
            pools=pools,
            contents=contents,  # which val/ and test/ these are: a run checks them before using them
        )
        staging.file(data_dir / SPLITS_FILE).write_text(json.dumps(record))
    return record


def prepare_stress_sets(
    data_dir: str | Path,
    *,
    mnist_root: str | Path,
    images_per_set: int = 2000,
    seed: int = 0,
    composer: dict | None = None,
) -> dict[str, Path]:
    """Write data_dir/stress/<name>/ for every entry of STRESS_SETS, and data_dir/stress/mnist_digits/
    (see mnist_digits), and return the folders.

    Only MNIST test digits are used. Every set is composed with seed + STRESS_SEED_OFFSET, unlike
    val's and test's draws; so image i holds the same digits in the same layout in every set, and
    the sets differ only by their stress. composer holds the base settings the stresses change.
    The sets are moved into place together once all are written."""
    if images_per_set < 1:
        raise ValueError(f"need at least one image per stress set, got {images_per_set}")
    settings = {name: {**EVAL_COMPOSER, **(composer or {}), **stress} for name, (stress, _) in STRESS_SETS.items()}
    for name, stressed in settings.items():
        try:
            check_composer_settings(**stressed)
        except ValueError as error:
            raise ValueError(f"stress set {name}: {error}") from error
    folders = {name: Path(data_dir) / STRESS_DIR / name for name in [*STRESS_SETS, MNIST_DIGITS]}
    for folder in folders.values():
        check_destination(folder, DATASET_FILES)
    images, labels = load_mnist(mnist_root, train=False)
    with Staging() as staging:
        for name, (_, description) in STRESS_SETS.items():
            stressed = MultiDigitComposer(images, labels, **settings[name])
            composites = generate(stressed, images_per_set, seed + STRESS_SEED_OFFSET)
            metadata = dict(
                stressed.settings(),
                seed=seed + STRESS_SEED_OFFSET,
                mnist_split="test",
                stress=name,
                stress_description=description,
            )
            write_dataset_files(staging.folder(folders[name], DATASET_FILES), composites, metadata)
        size = stressed.canvas_size  # the canvas every stress set was composed on
        metadata = dict(
            canvas_size=size, mnist_split="test", stress=MNIST_DIGITS, stress_description=MNIST_DIGITS_DESCRIPTION
        )
        alone = mnist_digits(images, labels, size)
        write_dataset_files(staging.folder(folders[MNIST_DIGITS], DATASET_FILES), alone, metadata)
    return folders


def mnist_digits(images: np.ndarray, labels: np.ndarray, canvas_size: int) -> list[Composite]:
    """Each MNIST digit alone at the centre of a canvas, its 28x28 image (digit height about 20 px,
    within the trained range) as MNIST wrote it: the model and a 28x28 classifier read the same pixels."""
    at = (canvas_size - DIGIT_SIZE) // 2
    composites = []
    for index, (digit, label) in enumerate(zip(images, labels)):
        canvas = np.zeros((canvas_size, canvas_size), np.uint8)
        canvas[at : at + DIGIT_SIZE, at : at + DIGIT_SIZE] = digit
        x0, y0, x1, y1 = ink_box(digit) or (0, 0, DIGIT_SIZE, DIGIT_SIZE)
        composites.append(Composite(canvas, str(label), "scatter", [(x0 + at, y0 + at, x1 + at, y1 + at)], [index]))
    return composites


def split_digest(folder: Path) -> str:
    """What tells one val/ or test/ set from another: a digest of its images and records."""
    return file_digest(folder / "labels.json", folder / "images.npy")


def check_split_folders(data_dir: Path, splits: dict) -> None:
    """ValueError unless data_dir's val/ and test/ are the sets its splits.json was written with:
    a set of another split would hold digits the run trains on."""
    if "contents" not in splits:
        raise ValueError(
            f"{data_dir / SPLITS_FILE} does not say which val/ and test/ it was written with (an earlier "
            f"version wrote it): split again with split_multidigit_dataset.py --data-dir {data_dir}"
        )
    for split, digest in splits["contents"].items():
        if not (data_dir / split / "labels.json").is_file() or split_digest(data_dir / split) != digest:
            raise ValueError(
                f"{data_dir / split} is not the set {data_dir / SPLITS_FILE} was written with (missing, changed or "
                f"from another split): split again with split_multidigit_dataset.py --data-dir {data_dir}"
            )


def load_splits(data_dir: str | Path) -> dict:
    path = Path(data_dir) / SPLITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run split_multidigit_dataset.py --data-dir {data_dir} first")
    return json.loads(path.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLine(__doc__)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of MNIST training digits kept for validation"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stress",
        action="store_true",
        help=f"write only the stress sets, to DATA_DIR/{STRESS_DIR}/<name>/ (MNIST test digits; no splitting)",
    )
    parser.add_argument("--stress-images", type=int, default=2000, help="images per stress set")
    add_composer_arguments(parser)
    parser.set_defaults(**EVAL_COMPOSER)  # evaluation sets show the digits as written (see the module docstring)
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = dict(mnist_root=args.mnist_root, seed=args.seed, composer=composer_settings(args))
    try:
        if args.stress:
            check_dataset_size(args.stress_images, args.canvas_size, "--stress-images")
            folders = prepare_stress_sets(args.data_dir, images_per_set=args.stress_images, **settings)
        else:
            check_dataset_size(args.val_images, args.canvas_size, "--val-images")
            check_dataset_size(args.test_images, args.canvas_size, "--test-images")
            record = prepare_splits(
                args.data_dir,
                val_images=args.val_images,
                test_images=args.test_images,
                val_fraction=args.val_fraction,
                **settings,
            )
    except (ValueError, MnistUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only folder, ...: nothing is left half-written
        print(f"error: writing to {args.data_dir} failed ({error}); nothing was written there", file=sys.stderr)
        return 1
    if args.stress:
        for name, (_, description) in STRESS_SETS.items():
            print(f"wrote {folders[name]} ({args.stress_images} images): {description}")
        print(f"wrote {folders[MNIST_DIGITS]} ({MNIST_COUNTS['test']} images): {MNIST_DIGITS_DESCRIPTION}")
        return 0
    pools = record["pools"]
    print(
        f"digit pools: train {len(pools['train'])}, val {len(pools['val'])} (MNIST train), "
        f"test {len(pools['test'])} (MNIST test)"
    )
    print(
        f"wrote {args.data_dir}/{SPLITS_FILE}, {args.data_dir}/val ({args.val_images} images), "
        f"{args.data_dir}/test ({args.test_images} images)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
