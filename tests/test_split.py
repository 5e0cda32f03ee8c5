import json
import os
import shutil

import numpy as np
import pytest
from test_generator import copy_mnist, full_disk_after, snapshot

from augment import crop_to_ink, resize
from conftest import run_script
from datasets import read_dataset
from split_multidigit_dataset import (
    MNIST_DIGITS,
    STRESS_SETS,
    load_splits,
    main,
    prepare_splits,
    prepare_stress_sets,
    split_digit_pools,
)


def test_digit_pools_are_disjoint_cover_everything_and_follow_the_seed():
    pools = split_digit_pools(1000, 0.1, seed=3)
    assert len(pools["val"]) == 100 and len(pools["train"]) == 900
    assert not set(pools["train"]) & set(pools["val"])
    assert sorted(pools["train"] + pools["val"]) == list(range(1000))
    assert split_digit_pools(1000, 0.1, seed=3) == pools and split_digit_pools(1000, 0.1, seed=4) != pools
    with pytest.raises(ValueError):
        split_digit_pools(1000, 1.5, seed=0)


def test_no_mnist_digit_appears_in_two_splits(tiny_data_dir, mnist_train, mnist_test):
    splits = load_splits(tiny_data_dir)
    train_pool, val_pool = set(splits["pools"]["train"]), set(splits["pools"]["val"])
    assert not train_pool & val_pool
    _, val_records, val_meta = read_dataset(tiny_data_dir / "val")
    _, test_records, test_meta = read_dataset(tiny_data_dir / "test")
    assert val_meta["mnist_split"] == "train" and test_meta["mnist_split"] == "test"
    val_sources = {i for r in val_records for i in r["sources"]}
    assert val_sources and val_sources <= val_pool and not val_sources & train_pool
    # Labels were read from the right MNIST split: each digit's label is that source's label.
    for records, (_, labels) in ((val_records, mnist_train), (test_records, mnist_test)):
        for r in records:
            assert r["label"] == "".join(str(labels[i]) for i in r["sources"])


def test_test_composites_show_mnist_test_digits_as_written(tiny_data_dir, mnist_test):
    # No rotation, shear or stroke change: each digit's ink box holds its MNIST digit, only cut to
    # its ink and scaled (the ceiling that "best MNIST models err on 0.2 % of digits" speaks of).
    images, records, metadata = read_dataset(tiny_data_dir / "test")
    assert metadata["augment_strength"] == 0.0
    digits, _ = mnist_test
    compared = 0
    for image, record in zip(images, records):
        for (x0, y0, x1, y1), source in zip(record["boxes"], record["sources"]):
            expected = resize(crop_to_ink(digits[source]), y1 - y0, x1 - x0)
            assert (image[y0:y1, x0:x1] == expected).all()
            compared += 1
    assert compared > 40


def test_split_cli_writes_pools_and_evaluation_sets(tmp_path, mnist_root):
    result = run_script(
        "split_multidigit_dataset.py",
        "--data-dir",
        str(tmp_path),
        "--mnist-root",
        str(mnist_root),
        "--val-images",
        "10",
        "--test-images",
        "12",
        "--seed",
        "7",
    )
    assert "digit pools: train 54000, val 6000" in result.stdout
    images, records, _ = read_dataset(tmp_path / "test")
    assert images.shape == (12, 96, 96) and len(records) == 12
    assert json.loads((tmp_path / "splits.json").read_text())["seed"] == 7
    assert (tmp_path / "val" / "preview.png").is_file()


def test_split_cli_refuses_bad_arguments(tmp_path):
    result = run_script(
        "split_multidigit_dataset.py",
        "--data-dir",
        str(tmp_path / "d"),
        "--val-fraction",
        "0",
        "--mnist-root",
        str(tmp_path),
        check=False,
    )
    assert result.returncode == 2 and "val_fraction" in result.stderr
    assert not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def stress_dir(tmp_path_factory, mnist_root):
    data_dir = tmp_path_factory.mktemp("stress")
    prepare_stress_sets(data_dir, mnist_root=mnist_root, images_per_set=12, seed=5)
    return data_dir


def test_stress_sets_are_written_from_mnist_test_digits_only(stress_dir, mnist_test):
    _, test_labels = mnist_test
    assert sorted(p.name for p in (stress_dir / "stress").iterdir()) == sorted([*STRESS_SETS, MNIST_DIGITS])
    assert not (stress_dir / "splits.json").exists(), "stress sets need no splits"
    digits_per_image = None
    for name, (stress, description) in STRESS_SETS.items():
        images, records, metadata = read_dataset(stress_dir / "stress" / name)
        assert images.shape == (12, 96, 96) and metadata["num_images"] == 12
        assert metadata["stress"] == name and metadata["stress_description"] == description
        assert metadata["mnist_split"] == "test" and metadata["seed"] == 5 + 3, (
            "a seed unlike val's (+1) and test's (+2)"
        )
        assert all(
            metadata[key] == (list(value) if isinstance(value, tuple) else value) for key, value in stress.items()
        )
        assert (stress_dir / "stress" / name / "preview.png").is_file()
        for r in records:
            assert all(0 <= i < len(test_labels) for i in r["sources"])
            assert r["label"] == "".join(str(test_labels[i]) for i in r["sources"])
            if "digit_height" in stress:
                low, high = stress["digit_height"]
                assert all(low <= y1 - y0 <= high for _, y0, _, y1 in r["boxes"])
        if {"layout", "max_digits", "nondigit_share", "overflow_share"} & set(stress):
            continue  # these sets compose other things than the base set
        # Image i holds the same digits in every other set, so those differ only by their stress.
        digits = [sorted(r["sources"]) for r in records]
        assert digits_per_image in (None, digits)
        digits_per_image = digits
    assert {len(d) for d in digits_per_image} - {0}, "some images hold digits"


def test_mnist_digits_are_the_pixels_a_28x28_classifier_reads(stress_dir, mnist_test):
    images, labels = mnist_test
    canvases, records, metadata = read_dataset(stress_dir / "stress" / MNIST_DIGITS)
    assert canvases.shape == (len(images), 96, 96), "every MNIST test digit, whatever --stress-images says"
    assert metadata["stress"] == MNIST_DIGITS and metadata["mnist_split"] == "test"
    at = (96 - 28) // 2
    assert np.array_equal(canvases[:, at : at + 28, at : at + 28], images), "the digit unchanged at the centre"
    assert canvases.sum(dtype=np.int64) == images.sum(dtype=np.int64), "and nothing else on the canvas"
    assert [r["label"] for r in records] == [str(d) for d in labels]
    assert [r["sources"] for r in records] == [[i] for i in range(len(images))]
    for r, canvas in zip(records[:200], canvases[:200]):
        (x0, y0, x1, y1), ys, xs = r["boxes"][0], *np.nonzero(canvas > 32)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_stress_cli_writes_only_the_stress_sets(tmp_path, mnist_root, capsys):
    assert main(["--data-dir", str(tmp_path), "--mnist-root", str(mnist_root), "--stress", "--stress-images", "3"]) == 0
    out = capsys.readouterr().out
    assert all(f"stress/{name} (3 images)" in out for name in STRESS_SETS)
    assert f"stress/{MNIST_DIGITS} (10000 images)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stress"]
    images, _, metadata = read_dataset(tmp_path / "stress" / "height_14")
    assert images.shape == (3, 96, 96) and metadata["digit_height"] == [14, 14] and metadata["seed"] == 3


def test_stress_cli_refuses_bad_arguments_before_work(tmp_path, capsys):
    for args, message in (
        (["--stress-images", "0"], "at least one image"),
        (["--max-digits", "5"], "stress set height_32"),
    ):
        assert (
            main(
                ["--data-dir", str(tmp_path / "d"), "--stress", *args, "--mnist-root", str(tmp_path / "no-mnist-here")]
            )
            == 2
        )
        assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "no-mnist-here").exists()


# ---- bad input and failed writes: one line, exit 2 for bad input and 1 for failed work, nothing left behind


def test_split_cli_refuses_mnist_files_from_different_splits(tmp_path, mnist_root, capsys):
    raw = copy_mnist(mnist_root, tmp_path / "mnist")
    shutil.copyfile(raw / "train-labels-idx1-ubyte", raw / "t10k-labels-idx1-ubyte")
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--mnist-root", str(tmp_path / "mnist"), "--val-images", "2", "--test-images", "2"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: {raw}/t10k-labels-idx1-ubyte holds 60000 labels, the test images 10000: "
        "the files are from different MNIST splits; restore the original files\n"
    )
    assert not data.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--augment-strength", "nan"], "augment_strength must be 0 to 5, got nan"),
        (["--length-weights", "nan,1,1,1,1"], "length_weights must be 5 non-negative numbers"),
        (["--val-images", str(10**12)], "--val-images 1000000000000: composing that many"),
        (["--stress", "--stress-images", str(10**12)], "--stress-images 1000000000000: composing that many"),
    ],
)
def test_split_cli_refuses_non_finite_and_huge_numbers_before_loading_mnist(tmp_path, capsys, flags, message):
    assert main(["--data-dir", str(tmp_path / "d"), "--mnist-root", str(tmp_path / "no-mnist-here"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "d").exists() and not (tmp_path / "no-mnist-here").exists()


def test_split_cli_refuses_a_negative_seed_and_a_data_dir_it_would_damage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--data-dir", str(tmp_path / "d"), "--seed", "-1", "--mnist-root", str(tmp_path)])
    assert exit.value.code == 2 and "--seed must be >= 0, got -1" in capsys.readouterr().err
    (tmp_path / "d" / "val").mkdir(parents=True)
    (tmp_path / "d" / "val" / "notes.txt").write_text("keep me")
    assert main(["--data-dir", str(tmp_path / "d"), "--mnist-root", str(tmp_path / "no-mnist-here")]) == 2
    assert "val is replaced whole when written, and it holds notes.txt" in capsys.readouterr().err
    assert snapshot(tmp_path) == {"d/val/notes.txt": b"keep me"}


def test_split_cli_failing_midway_keeps_the_older_data_whole(tmp_path, mnist_root, monkeypatch, capsys):
    data = tmp_path / "data"
    prepare_splits(data, mnist_root=mnist_root, val_images=3, test_images=3, seed=1)
    kept = snapshot(tmp_path)
    full_disk_after(monkeypatch, np, "save", 2)  # val's images are written, test's are not
    for folder in (data, tmp_path / "new"):
        args = ["--data-dir", str(folder), "--mnist-root", str(mnist_root), "--val-images", "2", "--test-images", "2"]
        assert main([*args, "--seed", "2"]) == 1
        assert capsys.readouterr().err.endswith(
            f"error: writing to {folder} failed ([Errno 28] No space left on device); nothing was written there\n"
        )
    # The older val/, test/ and splits.json untouched, and no temporary files beside them.
    assert snapshot(tmp_path) == kept and os.listdir(tmp_path) == ["data"]
    assert sorted(os.listdir(data)) == ["splits.json", "test", "val"]


def test_stress_sets_are_written_all_or_none(tmp_path, mnist_root, monkeypatch, capsys):
    full_disk_after(monkeypatch, np, "save", 5)
    args = ["--data-dir", str(tmp_path / "d"), "--mnist-root", str(mnist_root), "--stress", "--stress-images", "2"]
    assert main(args) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
