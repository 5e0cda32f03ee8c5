"""Shared fixtures: MNIST (from $MNIST_ROOT, ../shared/mnist or data/), a tiny data folder
and a tiny trained checkpoint, each made once per test session (and shared by its workers)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist import MNIST_FILES, load_mnist
from multidigit_generator import MultiDigitComposer
from split_multidigit_dataset import prepare_splits

REPO = Path(__file__).resolve().parents[1]

# Each xdist worker gets its share of the cores for PyTorch, and so do the scripts it starts
# (OMP_NUM_THREADS): two workers of two threads each on two cores wait on each other's threads
# and run the PyTorch-heavy tests several times slower.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    share = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_MODEL = (
    "--patch-size 12 --stem-width 16 --d-model 32 --n-heads 2 --encoder-layers 1 --decoder-layers 1 --ff-mult 2".split()
)


def run_script(script: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, from the repository root."""
    result = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_SILENT": "true", **(env or {})},
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory) -> Path:
    """The precision probe's cache (precision.precision_cache_file) in a folder of this session's, for
    the tests and the scripts they run: a test never reads a choice made before it, nor leaves one."""
    folder = tmp_path_factory.mktemp("cache")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    return folder


@pytest.fixture(autouse=True)
def torch_threads():
    """Training and reading in this process may set PyTorch's thread count (precision.choose_precision,
    --threads): each test starts with the count the process started with."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    candidates = [os.environ.get("MNIST_ROOT"), REPO.parent / "shared" / "mnist", REPO / "data"]
    for root in filter(None, candidates):
        if all((Path(root) / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES):
            return Path(root).resolve()
    message = "MNIST raw files not found: set MNIST_ROOT to a folder holding MNIST/raw/"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must provide MNIST)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def mnist_test(mnist_root) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(mnist_root, train=False)


@pytest.fixture(scope="session")
def mnist_train(mnist_root) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(mnist_root, train=True)


def made_once(tmp_path_factory, worker_id: str, name: str, make: Callable[[Path], None]) -> Path:
    """A folder made once per test session and only read by the tests: under pytest-xdist the
    first worker to ask makes it (under a lock) and the others wait for it and share it."""
    if worker_id == "master":  # one process: nothing to share
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # this session's, common to its workers
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".made").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, worker_id, mnist_root) -> Path:
    def make(data_dir: Path) -> None:
        prepare_splits(data_dir, mnist_root=mnist_root, val_images=48, test_images=48, seed=0)

    return made_once(tmp_path_factory, worker_id, "data", make)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id, tiny_data_dir, mnist_root) -> Path:
    """A tiny model trained for 2 epochs of 4 steps, with wandb logging offline."""
    return made_once(tmp_path_factory, worker_id, "run", lambda out_dir: train_tiny(out_dir, tiny_data_dir, mnist_root))


def train_tiny(out_dir: Path, tiny_data_dir: Path, mnist_root: Path) -> None:
    run_script(
        "train_encoder_decoder.py",
        "--data-dir",
        str(tiny_data_dir),
        "--mnist-root",
        str(mnist_root),
        "--out-dir",
        str(out_dir),
        "--epochs",
        "2",
        "--train-images",
        "128",
        "--batch-size",
        "32",
        "--num-workers",
        "0",
        "--wandb",
        "offline",
        *TINY_MODEL,
        env={"WANDB_DIR": str(out_dir)},
    )
    assert json.loads((out_dir / "test_metrics.json").read_text())["test"]


@pytest.fixture(scope="session")
def shipped_model():
    """The model the repository ships (checkpoints/), read in fp32 on the CPU."""
    from checkpoint import DEFAULT_CHECKPOINT, load_model

    return load_model(DEFAULT_CHECKPOINT, "cpu", precision="fp32")


@pytest.fixture(scope="session")
def composite(mnist_test):
    """A three-digit row of MNIST test digits, composed as the evaluation sets are: the digits
    as written, no augmentation."""
    images, labels = mnist_test
    composer = MultiDigitComposer(images, labels, min_digits=3, max_digits=3, layout="row", augment_strength=0.0)
    return composer.compose(np.random.default_rng(0))
