import json

import pytest

from conftest import run_script
from multidigit_generator import read_dataset
from split_multidigit_dataset import load_splits, split_digit_pools


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


def test_split_cli_writes_pools_and_evaluation_sets(tmp_path, mnist_root):
    result = run_script("split_multidigit_dataset.py", "--data-dir", str(tmp_path), "--mnist-root", str(mnist_root),
                        "--val-images", "10", "--test-images", "12", "--seed", "7")
    assert "digit pools: train 54000, val 6000" in result.stdout
    images, records, _ = read_dataset(tmp_path / "test")
    assert images.shape == (12, 96, 96) and len(records) == 12
    assert json.loads((tmp_path / "splits.json").read_text())["seed"] == 7
    assert (tmp_path / "val" / "preview.png").is_file()


def test_split_cli_refuses_bad_arguments(tmp_path):
    result = run_script("split_multidigit_dataset.py", "--data-dir", str(tmp_path / "d"), "--val-fraction", "0",
                        "--mnist-root", str(tmp_path), check=False)
    assert result.returncode == 2 and "val_fraction" in result.stderr
    assert not (tmp_path / "d").exists()
