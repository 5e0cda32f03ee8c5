from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import run_script
from multidigit_generator import (
    DIGIT_SIZE,
    MNIST_FILES,
    MnistUnavailableError,
    MultiDigitComposer,
    generate,
    load_mnist,
    read_dataset,
)


@pytest.fixture(scope="module")
def composites(mnist_test):
    images, labels = mnist_test
    return generate(MultiDigitComposer(images, labels), 600, seed=0, progress=False)


def centre_x(box):
    return (box[0] + box[2]) / 2


def test_labels_are_the_mnist_labels_of_the_digits_drawn_in_reading_order(composites, mnist_test):
    _, labels = mnist_test
    for c in composites:
        assert c.label == "".join(str(labels[i]) for i in c.sources)
        assert len(c.boxes) == len(c.label)
        xs = [centre_x(b) for b in c.boxes]
        assert xs == sorted(xs), "boxes must be listed left to right"


def test_ink_lies_only_inside_the_digit_boxes_and_every_box_has_ink(composites):
    for c in composites:
        outside = np.ones_like(c.image, dtype=bool)
        for x0, y0, x1, y1 in c.boxes:
            assert 0 <= x0 < x1 <= c.image.shape[1] and 0 <= y0 < y1 <= c.image.shape[0]
            assert c.image[y0:y1, x0:x1].max() > 100, f"empty box in {c.layout} image {c.label}"
            outside[y0:y1, x0:x1] = False
        assert c.image[outside].max(initial=0) == 0


def test_scatter_digits_never_overlap_and_centres_keep_their_gap(composites):
    scatter = [c for c in composites if c.layout == "scatter"]
    assert len(scatter) > 200
    for c in scatter:
        for i, a in enumerate(c.boxes):
            assert a[2] - a[0] == a[3] - a[1] == DIGIT_SIZE
            for b in c.boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "boxes overlap"
                assert centre_x(b) - centre_x(a) >= 12


def test_row_digits_are_handwriting_sized_and_left_to_right(composites):
    rows = [c for c in composites if c.layout == "row" and c.label]
    assert len(rows) > 200
    for c in rows:
        for a, b in zip(c.boxes, c.boxes[1:]):
            assert a[2] < b[0], "row digits are separated by a gap"
        assert all(15 <= y1 - y0 <= 31 for _, y0, _, y1 in c.boxes)


def test_lengths_follow_the_requested_range_uniformly(composites, mnist_test):
    counts = Counter(len(c.label) for c in composites)
    assert set(counts) == {0, 1, 2, 3, 4}
    assert all(abs(n - 120) < 4 * np.sqrt(600 * 0.2 * 0.8) for n in counts.values()), counts
    assert all(c.image.max() == 0 for c in composites if c.label == "")  # blank canvas, empty label
    images, labels = mnist_test
    narrow = generate(MultiDigitComposer(images, labels, min_digits=2, max_digits=3, layout="row"), 100, seed=1, progress=False)
    assert {len(c.label) for c in narrow} == {2, 3} and {c.layout for c in narrow} == {"row"}


def test_same_seed_same_bytes(mnist_test):
    images, labels = mnist_test
    composer = MultiDigitComposer(images, labels)
    first, again, other = (generate(composer, 40, seed, progress=False) for seed in (5, 5, 6))
    assert all(a.image.tobytes() == b.image.tobytes() and a.label == b.label for a, b in zip(first, again))
    assert any(a.image.tobytes() != b.image.tobytes() for a, b in zip(first, other))


def test_crowded_scatter_still_places_every_digit(mnist_test):
    images, labels = mnist_test
    five = generate(MultiDigitComposer(images, labels, min_digits=5, max_digits=5, layout="scatter"), 30, seed=0, progress=False)
    assert all(len(c.label) == len(c.boxes) == 5 for c in five)


@pytest.mark.parametrize("settings, message", [
    (dict(max_digits=9, layout="scatter"), "do not fit"),
    (dict(max_digits=20), "do not fit"),
    (dict(min_digits=3, max_digits=2), "min_digits"),
    (dict(layout="spiral"), "layout"),
    (dict(canvas_size=20), "canvas_size"),
])
def test_invalid_settings_fail_with_a_clear_message(settings, message):
    with pytest.raises(ValueError, match=message):
        MultiDigitComposer(np.zeros((1, 28, 28), np.uint8), np.zeros(1), **settings)


def test_cli_rejects_impossible_arguments_before_loading_mnist(tmp_path):
    result = run_script("multidigit_generator.py", "--out", str(tmp_path / "x"), "--max-digits", "9",
                        "--layout", "scatter", "--mnist-root", str(tmp_path / "no-mnist-here"), check=False)
    assert result.returncode == 2
    assert "do not fit on a 96x96 canvas" in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "no-mnist-here").exists()


def test_cli_writes_a_dataset_folder(tmp_path, mnist_root):
    out = tmp_path / "set"
    run_script("multidigit_generator.py", "--out", str(out), "--split", "test", "--num-images", "40",
               "--seed", "3", "--mnist-root", str(mnist_root))
    images, records, metadata = read_dataset(out)
    assert images.shape == (40, 96, 96) and images.dtype == np.uint8
    assert metadata["num_images"] == 40 and metadata["seed"] == 3 and metadata["mnist_split"] == "test"
    assert sum(metadata["per_length"].values()) == 40
    assert metadata["per_length"] == {str(k): v for k, v in sorted(Counter(len(r["label"]) for r in records).items())}
    with Image.open(out / "preview.png") as preview:
        assert preview.width > 500 and preview.height > 100


def test_missing_mnist_says_which_files_to_put_where(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")  # what torchvision raises offline

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(MnistUnavailableError) as error:
        load_mnist(tmp_path, train=True)
    message = str(error.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "MNIST_ROOT" in message
    assert all(name in message for name in MNIST_FILES)


def test_mnist_loads_offline_from_raw_files(mnist_root):
    images, labels = load_mnist(mnist_root, train=False)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
