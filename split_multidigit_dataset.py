"""Split MNIST digits into train / validation / test pools, then compose the evaluation sets.

No MNIST digit image appears in two splits:
  train  composites drawn from a random (1 - val_fraction) share of the MNIST training digits
         (composed fresh every epoch by train_encoder_decoder.py, so none are written here)
  val    composites drawn only from the remaining MNIST training digits
  test   composites drawn only from the MNIST test digits

Writes data_dir/splits.json (the digit pools and every setting) and data_dir/val/ and
data_dir/test/ dataset folders (see multidigit_generator.write_dataset). Splitting comes
before generating because composites cannot be split afterwards without sharing digits.

    uv run python split_multidigit_dataset.py --data-dir data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from multidigit_generator import (
    MnistUnavailableError,
    MultiDigitComposer,
    add_composer_arguments,
    check_composer_settings,
    composer_settings,
    generate,
    load_mnist,
    write_dataset,
)

SPLITS_FILE = "splits.json"


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
    """Write splits.json, val/ and test/ under data_dir and return the splits record."""
    if val_images < 1 or test_images < 1:
        raise ValueError(f"need at least one validation and one test image, got {val_images} and {test_images}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    composer = composer or {}
    check_composer_settings(**composer)
    data_dir = Path(data_dir)
    train_images, train_labels = load_mnist(mnist_root, train=True)
    test_digits, test_labels = load_mnist(mnist_root, train=False)
    pools = split_digit_pools(len(train_images), val_fraction, seed)
    pools["test"] = list(range(len(test_digits)))
    sources = {"val": (train_images, train_labels, "train"), "test": (test_digits, test_labels, "test")}
    counts = {"val": val_images, "test": test_images}
    for offset, split in enumerate(("val", "test"), start=1):
        images, labels, mnist_split = sources[split]
        pool = np.asarray(pools[split])
        split_composer = MultiDigitComposer(images[pool], labels[pool], **composer)
        # Different seeds per split, so val and test are not the same draws from different digits.
        composites = generate(split_composer, counts[split], seed + offset, pool_indices=pool)
        write_dataset(data_dir / split, composites, dict(split_composer.settings(), seed=seed + offset, mnist_split=mnist_split))
    record = dict(seed=seed, val_fraction=val_fraction, val_images=val_images, test_images=test_images,
                  composer=split_composer.settings(), pools=pools)
    (data_dir / SPLITS_FILE).write_text(json.dumps(record))
    return record


def load_splits(data_dir: str | Path) -> dict:
    path = Path(data_dir) / SPLITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run split_multidigit_dataset.py --data-dir {data_dir} first")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of MNIST training digits kept for validation")
    parser.add_argument("--seed", type=int, default=0)
    add_composer_arguments(parser)
    args = parser.parse_args(argv)
    try:
        record = prepare_splits(args.data_dir, mnist_root=args.mnist_root, val_images=args.val_images,
                                test_images=args.test_images, val_fraction=args.val_fraction, seed=args.seed,
                                composer=composer_settings(args))
    except (ValueError, OSError, MnistUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    pools = record["pools"]
    print(f"digit pools: train {len(pools['train'])}, val {len(pools['val'])} (MNIST train), test {len(pools['test'])} (MNIST test)")
    print(f"wrote {args.data_dir}/{SPLITS_FILE}, {args.data_dir}/val ({args.val_images} images), {args.data_dir}/test ({args.test_images} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
