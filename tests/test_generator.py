import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import marks as marks_module
from augment import augment_digit, degrade_like_a_scan, elastic_distort, ink_box
from conftest import run_script
from datasets import DATASET_FILES, CachedComposites, FreshComposites, read_dataset, write_dataset
from files import Staging
from marks import MARK_KINDS, draw_mark, draw_mark_cell, draw_one_mark_cell, looks_like_a_zero
from mnist import MNIST_FILES, MnistUnavailableError, load_mnist
from multidigit_generator import (
    DIGIT_SPACING,
    MIN_DIGIT_WIDTH,
    Composite,
    MultiDigitComposer,
    compose_row,
    compose_scatter,
    generate,
    main,
    row_capacity,
    scatter_capacity,
)


@pytest.fixture(scope="module")
def composites(mnist_test):
    images, labels = mnist_test
    return generate(MultiDigitComposer(images, labels), 600, seed=0, progress=False)


def centre_x(box):
    return (box[0] + box[2]) / 2


def height(box):
    return box[3] - box[1]


def apart(a, b, space=DIGIT_SPACING):
    """Boxes a and b neither overlap nor come closer than space pixels."""
    return a[2] + space <= b[0] or b[2] + space <= a[0] or a[3] + space <= b[1] or b[3] + space <= a[1]


def check_labels_and_boxes(c, labels, *, scanned=False):
    """What every composite promises: the label is its digits' labels in reading order, one box per
    digit, listed left to right, each holding ink, all ink inside them (unless scanned, which
    greys the background), scatter boxes apart."""
    assert c.label == "".join(str(labels[i]) for i in c.sources)
    assert len(c.boxes) == len(c.label)
    xs = [centre_x(b) for b in c.boxes]
    assert xs == sorted(xs), "boxes must be listed left to right"
    outside = np.ones_like(c.image, dtype=bool)
    for x0, y0, x1, y1 in c.boxes:
        assert 0 <= x0 < x1 <= c.image.shape[1] and 0 <= y0 < y1 <= c.image.shape[0]
        ink = np.median(c.image) + 40 if scanned else 100
        assert c.image[y0:y1, x0:x1].max() > ink, f"empty box in {c.layout} image {c.label}"
        outside[y0:y1, x0:x1] = False
    if not scanned:
        assert c.image[outside].max(initial=0) == 0
    if c.layout == "scatter":
        for i, a in enumerate(c.boxes):
            for b in c.boxes[i + 1 :]:
                assert apart(a, b), f"boxes {a} and {b} overlap or touch"
                assert centre_x(b) - centre_x(a) >= 12


def test_labels_boxes_and_ink_agree_in_reading_order(composites, mnist_test):
    _, labels = mnist_test
    for c in composites:
        check_labels_and_boxes(c, labels)


def test_scatter_digits_span_the_height_range_and_keep_their_gaps(composites):
    scatter = [c for c in composites if c.layout == "scatter"]
    assert len(scatter) > 200
    boxes = [b for c in scatter for b in c.boxes]
    heights = Counter(height(b) for b in boxes)
    assert set(heights) == set(range(18, 29)), "every ink height from 18 to 28 px, none outside"
    assert min(heights.values()) > len(boxes) / 11 / 3, f"heights are drawn uniformly: {sorted(heights.items())}"
    assert all(MIN_DIGIT_WIDTH <= x1 - x0 <= 28 for x0, _, x1, _ in boxes)


def test_scatter_places_digits_anywhere_on_the_canvas(composites):
    """Not a 28x28 grid of MNIST boxes: ink boxes reach the edges and start at every offset."""
    boxes = [b for c in composites if c.layout == "scatter" for b in c.boxes]
    assert {b[0] for b in boxes} >= set(range(0, 60)) and {b[1] for b in boxes} >= set(range(0, 60))
    assert any(b[0] == 0 for b in boxes) and any(b[2] == 96 for b in boxes) and any(b[3] == 96 for b in boxes)


def test_row_digits_are_handwriting_sized_and_left_to_right(composites):
    rows = [c for c in composites if c.layout == "row" and c.label]
    assert len(rows) > 200
    for c in rows:
        for a, b in zip(c.boxes, c.boxes[1:]):
            assert a[2] < b[0], "row digits are separated by a gap"
        assert all(18 <= height(b) <= 28 for b in c.boxes)
        assert min(b[1] for b in c.boxes) >= 1 and max(b[3] for b in c.boxes) <= 95, (
            "rows keep a pixel clear of the edges"
        )


def test_lengths_follow_the_requested_range_uniformly(composites, mnist_test):
    counts = Counter(len(c.label) for c in composites)
    assert set(counts) == {0, 1, 2, 3, 4}
    assert all(abs(n - 120) < 4 * np.sqrt(600 * 0.2 * 0.8) for n in counts.values()), counts
    assert all(c.image.max() == 0 for c in composites if c.label == "")  # blank canvas, empty label
    images, labels = mnist_test
    narrow = generate(
        MultiDigitComposer(images, labels, min_digits=2, max_digits=3, layout="row"), 100, seed=1, progress=False
    )
    assert {len(c.label) for c in narrow} == {2, 3} and {c.layout for c in narrow} == {"row"}


def test_length_weights_set_how_often_each_count_is_drawn(mnist_test):
    images, labels = mnist_test
    composer = MultiDigitComposer(images, labels, length_weights=[0, 1, 0, 0, 3], augment_strength=0.0)
    counts = Counter(len(c.label) for c in generate(composer, 400, seed=2, progress=False))
    assert set(counts) == {1, 4}
    assert abs(counts[4] - 300) < 4 * np.sqrt(400 * 0.75 * 0.25), counts


def test_same_seed_same_bytes(mnist_test):
    images, labels = mnist_test
    composer = MultiDigitComposer(images, labels)
    first, again, other = (generate(composer, 40, seed, progress=False) for seed in (5, 5, 6))
    assert all(a.image.tobytes() == b.image.tobytes() and a.label == b.label for a, b in zip(first, again))
    assert any(a.image.tobytes() != b.image.tobytes() for a, b in zip(first, other))


def test_processes_composing_one_cache_at_once_share_its_epochs(tmp_path, mnist_test):
    # Another process holds epoch 1's lock: this one composes epoch 2, then waits for epoch 1
    # and takes it as the other process wrote it.
    images, labels = mnist_test
    caches = [CachedComposites(FreshComposites(MultiDigitComposer(images, labels), 20, seed=1), tmp_path) for _ in "ab"]
    composed = []
    for cache in caches:
        compose_epoch = cache.compose_epoch
        cache.compose_epoch = lambda epoch, *args, c=compose_epoch: composed.append(epoch) or c(epoch, *args)
    with caches[1].epoch_lock(0, wait=True):
        other = threading.Thread(target=caches[0].compose, args=(range(2), 0, False))
        other.start()
        deadline = time.monotonic() + 120
        while caches[0].missing([1]):
            assert time.monotonic() < deadline, "the other process never composed epoch 2"
            time.sleep(0.05)
        caches[1].compose_epoch(0, 0, tqdm(disable=True), lambda: False)
    other.join(timeout=60)
    assert not other.is_alive() and composed == [1, 0] and caches[0].missing(range(2)) == []


def test_a_change_to_any_code_that_draws_composites_names_another_cache(tmp_path, mnist_test, monkeypatch):
    from datasets import composites_key

    images, labels = mnist_test
    drawn_by = {path.name for path in MultiDigitComposer.drawing_code}
    assert {"multidigit_generator.py", "augment.py", "marks.py"} <= drawn_by  # the composer and what it calls
    fresh = FreshComposites(MultiDigitComposer(images, labels), 12, seed=5)
    key = composites_key(fresh)
    for changed in MultiDigitComposer.drawing_code:
        copies = []
        for path in MultiDigitComposer.drawing_code:
            copies.append(tmp_path / changed.stem / path.name)
            copies[-1].parent.mkdir(exist_ok=True)
            copies[-1].write_bytes(path.read_bytes() + (b"# changed\n" if path == changed else b""))
        with monkeypatch.context() as patch:
            patch.setattr(MultiDigitComposer, "drawing_code", tuple(copies))
            assert composites_key(fresh) != key, changed.name


def test_a_damaged_emptied_or_swapped_cache_epoch_is_composed_again(tmp_path, mnist_test, capsys):
    images, labels = mnist_test
    fresh = FreshComposites(MultiDigitComposer(images, labels), 12, seed=5)
    cached = CachedComposites(FreshComposites(MultiDigitComposer(images, labels), 12, seed=5), tmp_path)
    cached.compose(range(4), workers=0, progress=False)
    cut, emptied, second, third = (cached.epoch_folder(e) for e in range(4))
    (cut / "images.npy").write_bytes((cut / "images.npy").read_bytes()[:500])
    for name in DATASET_FILES:
        (emptied / name).unlink()
    second.rename(tmp_path / "aside")
    third.rename(second)
    (tmp_path / "aside").rename(third)
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = cached.folder / f".{cut.name}.partial-{killed.stdout.strip()}-0123abcd"  # a killed writer's
    left.mkdir()
    assert cached.missing(range(4)) == [0, 1, 2, 3]
    cached.compose(range(4), workers=0, progress=True)
    said = capsys.readouterr().out
    assert all(
        f"{cached.epoch_folder(e)} does not hold epoch {e + 1} whole: composing it again" in said for e in range(4)
    )
    assert cached.missing(range(4)) == [] and not left.exists()
    for epoch in range(4):
        fresh.set_epoch(epoch)
        cached.set_epoch(epoch)
        assert all(torch.equal(fresh[i][0], cached[i][0]) and fresh[i][1] == cached[i][1] for i in range(12))


def test_cached_composites_are_the_fresh_ones_and_each_training_world_has_its_own(tmp_path, mnist_test):
    images, labels = mnist_test
    world = dict(pen_share=0.3, paper_noise=0.3, overflow_share=0.2, nondigit_share=0.1)
    fresh = FreshComposites(MultiDigitComposer(images, labels, **world), 40, seed=3)
    cached = CachedComposites(FreshComposites(MultiDigitComposer(images, labels, **world), 40, seed=3), tmp_path)
    with pytest.raises(FileNotFoundError, match="epoch-002 is missing"):  # folders count epochs from 1
        cached.set_epoch(1)
    cached.compose(range(2), workers=0, progress=False, stopped=lambda: True)
    assert cached.missing(range(2)) == [0, 1]  # asked to stop: nothing written, not even in part
    cached.compose(range(2), workers=2, progress=False)  # in worker processes, as training composes them
    for epoch in (1, 0):
        fresh.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(40):
            (image, *rest, boxes), (cached_image, *cached_rest, cached_boxes) = fresh[i], cached[i]
            assert torch.equal(image, cached_image) and rest == cached_rest and torch.equal(boxes, cached_boxes)
    assert cached.missing(range(3)) == [2]
    others = [
        FreshComposites(MultiDigitComposer(images, labels, **world), 40, seed=4),
        FreshComposites(MultiDigitComposer(images, labels, **world), 41, seed=3),
        FreshComposites(MultiDigitComposer(images, labels, **{**world, "pen_share": 0.2}), 40, seed=3),
        FreshComposites(MultiDigitComposer(images[1:], labels[1:], **world), 40, seed=3),
    ]
    folders = {cached.folder} | {CachedComposites(other, tmp_path).folder for other in others}
    assert len(folders) == 5
    assert (
        CachedComposites(FreshComposites(MultiDigitComposer(images, labels, **world), 40, 3), tmp_path).missing(
            range(2)
        )
        == []
    )  # the same world, seed and size: the same folder


@pytest.mark.parametrize(
    "settings", [dict(min_digits=5, max_digits=5), dict(min_digits=4, max_digits=4, digit_height=(32, 32))]
)
def test_crowded_scatter_still_places_every_digit(mnist_test, settings):
    images, labels = mnist_test
    crowded = generate(MultiDigitComposer(images, labels, layout="scatter", **settings), 30, seed=0, progress=False)
    assert all(len(c.label) == len(c.boxes) == settings["max_digits"] for c in crowded)
    for c in crowded:
        check_labels_and_boxes(c, labels)


@pytest.mark.parametrize("canvas_size", [48, 64, 96, 128])
@pytest.mark.parametrize("min_center_gap", [1, 12, 20, 33])
@pytest.mark.parametrize("digit_height", [(6, 10), (14, 20), (18, 28), (32, 32), (30, 40)])
def test_scatter_capacity_is_honest(canvas_size, min_center_gap, digit_height):
    """The fallback (forced by max_tries=0) places as many digits as scatter_capacity promises,
    whatever their proportions, apart and with their centres min_center_gap apart."""
    n = scatter_capacity(canvas_size, min_center_gap, digit_height[1])
    rng = np.random.default_rng(0)
    for _ in range(5):
        crops = [np.full((int(rng.integers(5, 40)), int(rng.integers(1, 60))), 255, np.uint8) for _ in range(n)]
        _, boxes, order = compose_scatter(crops, rng, canvas_size, min_center_gap, digit_height, max_tries=0)
        assert len(boxes) == n and sorted(order) == list(range(n))
        for i, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= canvas_size and 0 <= a[1] < a[3] <= canvas_size
            assert digit_height[0] <= height(a) <= digit_height[1]
            for b in boxes[i + 1 :]:
                assert apart(a, b) and centre_x(b) - centre_x(a) >= min_center_gap


@pytest.mark.parametrize("canvas_size", [48, 96])
@pytest.mark.parametrize("digit_height", [(18, 28), (32, 32)])
@pytest.mark.parametrize("tilt", [0.0, 20.0])
def test_row_capacity_is_honest(canvas_size, digit_height, tilt):
    """row_capacity wide digits fit in a row, tilted or not, however the heights and tilt fall."""
    n = row_capacity(canvas_size, digit_height[1], tilted=tilt > 0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        _, boxes = compose_row([np.full((20, 30), 255, np.uint8)] * n, rng, canvas_size, digit_height, tilt=tilt)
        assert len(boxes) == n
        assert all(0 <= x0 < x1 <= canvas_size and 0 <= y0 < y1 <= canvas_size for x0, y0, x1, y1 in boxes)
        assert [centre_x(b) for b in boxes] == sorted(centre_x(b) for b in boxes)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_digits=9, layout="scatter"), "do not fit"),
        (dict(max_digits=20), "do not fit"),
        (dict(max_digits=5, digit_height=(32, 32)), "do not fit"),
        (dict(min_digits=3, max_digits=2), "min_digits"),
        (dict(layout="spiral"), "layout"),
        (dict(canvas_size=20), "canvas_size"),
        (dict(digit_height=(28, 18)), "digit_height"),
        (dict(digit_height=(4, 18)), "digit_height"),
        (dict(digit_height=(18, 90)), "digit_height"),
        (dict(digit_height=(18,)), "digit_height"),
        (dict(stroke_width_change=5), "stroke_width_change"),
        (dict(pen_share=1.5), "pen_share"),
        (dict(paper_noise=float("nan")), "paper_noise"),
        (dict(nondigit_share=0.7, overflow_share=0.4), "add up to more than 1"),
        (dict(thickest_stroke=4), "thickest_stroke"),
        (dict(overflow_share=0.1, max_digits=7, layout="scatter", digit_height=(20, 28)), "9 digits do not fit"),
        (dict(aspect_stretch=(1.3, 0.75)), "aspect_stretch"),
        (dict(row_tilt=30), "row_tilt"),
        (dict(length_weights=[1, 1, 1]), "length_weights"),
        (dict(length_weights=[1, -1, 1, 1, 1]), "length_weights"),
        (dict(length_weights=[0, 0, 0, 0, 0]), "length_weights"),
        (dict(min_digits=2, length_weights=[1, 1, 1, 1, 1]), "fewer than min_digits"),
        (dict(length_weights=[math.nan, 1, 1, 1, 1]), "length_weights"),
        (dict(length_weights=[1, 1, math.inf, 1, 1]), "length_weights"),
        (dict(length_weights=[1e308] * 5), "finite sum"),  # each finite, their sum not
        (dict(augment_strength=math.nan), "augment_strength"),
        (dict(augment_strength=math.inf), "augment_strength"),
        (dict(augment_strength=1e6), "augment_strength"),
        (dict(augment_strength=5.5), "augment_strength must be 0 to 5"),
        (dict(augment_strength=-1), "augment_strength"),
        (dict(aspect_stretch=(1.0, math.inf)), "aspect_stretch"),
        (dict(aspect_stretch=(math.nan, 1.0)), "aspect_stretch"),
        (dict(aspect_stretch=(1.0, 1e6)), "aspect_stretch"),
        (dict(canvas_size=100_000), "canvas_size"),
    ],
)
def test_invalid_settings_fail_with_a_clear_message(settings, message):
    with pytest.raises(ValueError, match=message):
        MultiDigitComposer(np.zeros((1, 28, 28), np.uint8), np.zeros(1), **settings)


def test_cli_rejects_impossible_arguments_before_loading_mnist(tmp_path):
    result = run_script(
        "multidigit_generator.py",
        "--out",
        str(tmp_path / "x"),
        "--max-digits",
        "9",
        "--layout",
        "scatter",
        "--mnist-root",
        str(tmp_path / "no-mnist-here"),
        check=False,
    )
    assert result.returncode == 2
    assert "do not fit on a 96x96 canvas" in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "no-mnist-here").exists()


def test_settings_rebuild_the_composer_from_json(mnist_test):
    images, labels = mnist_test
    composer = MultiDigitComposer(
        images,
        labels,
        length_weights=[1, 2, 3, 4, 5],
        digit_height=(20, 24),
        stroke_width_change=2,
        aspect_stretch=(0.8, 1.2),
        hug_borders=True,
        row_tilt=5.0,
        scan_degradation=True,
    )
    settings = json.loads(json.dumps(composer.settings()))
    assert settings == composer.settings() and settings["digit_height"] == [20, 24]
    rebuilt = MultiDigitComposer(images, labels, **settings)
    assert rebuilt.settings() == settings
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    assert composer.compose(rng_a).image.tobytes() == rebuilt.compose(rng_b).image.tobytes()


def test_cli_writes_a_dataset_folder(tmp_path, mnist_root):
    out = tmp_path / "set"
    run_script(
        "multidigit_generator.py",
        "--out",
        str(out),
        "--split",
        "test",
        "--num-images",
        "40",
        "--seed",
        "3",
        "--digit-height",
        "20",
        "24",
        "--mnist-root",
        str(mnist_root),
    )
    images, records, metadata = read_dataset(out)
    assert images.shape == (40, 96, 96) and images.dtype == np.uint8
    assert metadata["num_images"] == 40 and metadata["seed"] == 3 and metadata["mnist_split"] == "test"
    assert metadata["digit_height"] == [20, 24] and metadata["stroke_width_change"] is None
    heights = {height(b) for r in records for b in r["boxes"]}
    assert heights <= set(range(20, 25)) and len(heights) > 2
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


@pytest.mark.parametrize(
    "script", ["multidigit_generator", "split_multidigit_dataset", "train_encoder_decoder", "bench", "cnn_reference"]
)
def test_every_script_says_where_to_put_mnist_when_it_is_missing(tmp_path, monkeypatch, capsys, script):
    import importlib

    import torchvision

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")  # what torchvision raises offline

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    nowhere = ["--mnist-root", str(tmp_path / "no-mnist")]
    args = {
        "multidigit_generator": ["--out", str(tmp_path / "set")],
        "split_multidigit_dataset": ["--data-dir", str(tmp_path / "data")],
        "train_encoder_decoder": ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")],
        "bench": ["--device", "cpu"],
        "cnn_reference": ["--steps", "1"],
    }[script]
    assert importlib.import_module(script).main([*args, *nowhere]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MNIST is not in") and "MNIST_ROOT" in err and "Traceback" not in err
    assert not (tmp_path / "set").exists() and not (tmp_path / "data" / "splits.json").exists()


def test_mnist_loads_offline_from_raw_files(mnist_root):
    images, labels = load_mnist(mnist_root, train=False)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))


# ---- stress options: each changes what it says, and labels and boxes stay right

STRESS_OPTIONS = {
    "thin": dict(stroke_width_change=-1),
    "thick": dict(stroke_width_change=2),
    "height_14": dict(digit_height=(14, 14)),
    "height_32": dict(digit_height=(32, 32)),
    "anywhere": dict(hug_borders=True, row_tilt=10.0),
    "stretched": dict(aspect_stretch=(0.75, 1.3)),
    "scanner": dict(scan_degradation=True),
}


def stressed(mnist_test, count=150, seed=0, **settings):
    images, labels = mnist_test
    settings = {"min_digits": 1, **settings}
    return generate(MultiDigitComposer(images, labels, **settings), count, seed=seed, progress=False)


@pytest.mark.parametrize("name", STRESS_OPTIONS)
def test_stressed_composites_keep_labels_and_boxes_right(mnist_test, name):
    _, labels = mnist_test
    composites = stressed(mnist_test, **STRESS_OPTIONS[name])
    assert {c.layout for c in composites} == {"scatter", "row"}
    for c in composites:
        assert c.image.dtype == np.uint8 and c.image.shape == (96, 96)
        check_labels_and_boxes(c, labels, scanned=name == "scanner")


def ink_share(composites):
    """Share of the digit boxes' pixels that are ink, over all digits."""
    ink = sum((c.image[y0:y1, x0:x1] > 128).sum() for c in composites for x0, y0, x1, y1 in c.boxes)
    return ink / sum((x1 - x0) * (y1 - y0) for c in composites for x0, y0, x1, y1 in c.boxes)


def test_stroke_width_change_thins_and_thickens_every_digit(mnist_test):
    images, _ = mnist_test
    for digit in images[:50]:
        plain, thin, thick = (augment_digit(digit, np.random.default_rng(0), stroke=k) for k in (0, -1, 2))
        assert (thin > 128).sum() < (plain > 128).sum() < (thick > 128).sum()
        assert thin.max() == plain.max() and (thin > 128).sum() > 0.1 * (plain > 128).sum(), (
            "thin strokes must not fade"
        )
    shares = {k: ink_share(stressed(mnist_test, stroke_width_change=k)) for k in (-1, 0, 2)}
    assert shares[-1] < 0.8 * shares[0] and shares[2] > 1.3 * shares[0], shares


@pytest.mark.parametrize("h", [14, 32])
def test_fixed_digit_height_makes_every_box_that_high(mnist_test, h):
    composites = stressed(mnist_test, digit_height=(h, h))
    assert {height(b) for c in composites for b in c.boxes} == {h}


def test_anywhere_puts_digits_against_the_edges_and_tilts_rows(mnist_test):
    anywhere, plain = (stressed(mnist_test, count=300, **settings) for settings in (STRESS_OPTIONS["anywhere"], {}))

    def touching(c):
        return sum(b[0] == 0 or b[1] == 0 or b[2] == 96 or b[3] == 96 for b in c.boxes)

    scatter = [c for c in anywhere if c.layout == "scatter"]
    assert sum(touching(c) for c in scatter) > 0.5 * sum(len(c.boxes) for c in scatter)
    assert any(c.image[:4, :4].max() > 0 for c in scatter) and any(c.image[-4:, -4:].max() > 0 for c in scatter), (
        "corners"
    )
    rows = [c for c in anywhere if c.layout == "row"]
    assert any(min(b[1] for b in c.boxes) == 0 for c in rows) and any(max(b[3] for b in c.boxes) == 96 for c in rows)
    assert sum(touching(c) > 0 for c in rows) > 0.5 * len(rows)

    def slope(c):  # of the line through the row's digit centres
        xs, ys = [centre_x(b) for b in c.boxes], [(b[1] + b[3]) / 2 for b in c.boxes]
        return abs(np.polyfit(xs, ys, 1)[0])

    tilted, level = ([slope(c) for c in cs if c.layout == "row" and len(c.boxes) >= 3] for cs in (anywhere, plain))
    assert np.mean(tilted) > 2 * np.mean(level) and max(tilted) > 0.12, (np.mean(tilted), np.mean(level))


def test_aspect_stretch_widens_and_narrows_digits(mnist_test):
    def median_aspect(factor):
        composites = stressed(mnist_test, aspect_stretch=(factor, factor))
        return np.median([(b[2] - b[0]) / height(b) for c in composites for b in c.boxes])

    assert 1.4 < median_aspect(1.3) / median_aspect(0.75) < 1.9


def test_scan_degradation_blurs_dims_and_greys_the_background(mnist_test):
    scanned, plain = (
        stressed(mnist_test, count=60, seed=4, **settings) for settings in (STRESS_OPTIONS["scanner"], {})
    )
    for s, p in zip(scanned, plain):
        assert s.label == p.label and s.boxes == p.boxes  # the same digits in the same places: degrading comes last
        background = np.ones_like(s.image, dtype=bool)
        for x0, y0, x1, y1 in s.boxes:
            background[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] = False
        ink = np.percentile(np.concatenate([s.image[y0:y1, x0:x1].ravel() for x0, y0, x1, y1 in s.boxes]), 99)
        assert np.median(s.image[background]) <= 70 and ink >= np.median(s.image[background]) + 60
        assert ink <= 255 and np.mean(s.image[background] > 0) > 0.5, "a noisy, not black, background"


def test_scan_degradation_blurs_edges():
    square = np.zeros((96, 96), np.uint8)
    square[28:68, 28:68] = 255
    for seed in range(10):
        scan = degrade_like_a_scan(square, np.random.default_rng(seed)).astype(float)
        background, inside, just_outside = scan[:, :16].mean(), scan[36:60, 36:60].mean(), scan[36:60, 27].mean()
        assert just_outside - background > 0.05 * (inside - background), "ink bleeds past the edge"


# ---- bad input and failed writes: one line, exit 2 for bad input and 1 for failed work, nothing left behind


def copy_mnist(mnist_root: Path, root: Path) -> Path:
    """The four raw MNIST files copied to root/MNIST/raw, free to be altered; returns that folder."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copyfile(mnist_root / "MNIST" / "raw" / name, raw / name)
    return raw


def swap(a: Path, b: Path) -> None:
    a.rename(a.with_name("swapping"))
    b.rename(a)
    a.with_name("swapping").rename(b)


@pytest.mark.parametrize(
    "alter, message",
    [
        (
            lambda raw: shutil.copyfile(raw / "train-labels-idx1-ubyte", raw / "t10k-labels-idx1-ubyte"),
            "{raw}/t10k-labels-idx1-ubyte holds 60000 labels, the test images 10000",
        ),
        (
            lambda raw: swap(raw / "train-images-idx3-ubyte", raw / "t10k-images-idx3-ubyte"),
            "{raw}/t10k-images-idx3-ubyte holds 60000 images, the test labels 10000",
        ),
    ],
    ids=["train labels for test labels", "image files swapped"],
)
def test_cli_refuses_mnist_files_from_different_splits(tmp_path, mnist_root, capsys, alter, message):
    raw = copy_mnist(mnist_root, tmp_path / "mnist")
    alter(raw)
    out = tmp_path / "set"
    args = ["--out", str(out), "--split", "test", "--num-images", "2", "--mnist-root", str(tmp_path / "mnist")]
    assert main(args) == 2
    expected = message.format(raw=raw) + ": the files are from different MNIST splits; restore the original files"
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "alter, message",
    [
        (
            lambda raw: shutil.copyfile(raw / "t10k-labels-idx1-ubyte", raw / "t10k-images-idx3-ubyte"),
            "t10k-images-idx3-ubyte is not an MNIST images file (idx magic number 2049, not 2051)",
        ),
        (
            lambda raw: os.truncate(raw / "t10k-images-idx3-ubyte", 5000),
            "t10k-images-idx3-ubyte is 5000 bytes, its header promises 7840016",
        ),
        (lambda raw: os.truncate(raw / "t10k-labels-idx1-ubyte", 6), "t10k-labels-idx1-ubyte is too short"),
        (
            lambda raw: (raw / "t10k-labels-idx1-ubyte").write_bytes(
                (raw / "t10k-labels-idx1-ubyte").read_bytes()[:8] + bytes([10]) * 10_000
            ),
            "t10k-labels-idx1-ubyte holds labels up to 10, MNIST's are 0-9",
        ),
        (
            lambda raw: (
                (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(
                    gzip.compress((raw / "t10k-labels-idx1-ubyte").read_bytes())[:3000]
                ),
                (raw / "t10k-labels-idx1-ubyte").unlink(),
            ),
            "t10k-labels-idx1-ubyte.gz cannot be unpacked",
        ),
    ],
    ids=["labels for images", "cut short", "no header", "labels over 9", "gz copy cut short"],
)
def test_damaged_mnist_files_are_named(tmp_path, mnist_root, alter, message):
    alter(copy_mnist(mnist_root, tmp_path))
    with pytest.raises(MnistUnavailableError, match="restore the original file") as error:
        load_mnist(tmp_path, train=False)
    assert message in str(error.value) and "could not be downloaded" not in str(error.value)
    load_mnist(tmp_path, train=True)  # the other split's files are fine


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--augment-strength", "nan"], "augment_strength must be 0 to 5, got nan"),
        (["--augment-strength", "1e6"], "augment_strength must be 0 to 5, got 1000000.0"),
        (["--length-weights", "nan,1,1,1,1"], "length_weights must be 5 non-negative numbers"),
        (["--num-images", str(10**12)], "--num-images 1000000000000: composing that many 96x96 images needs about"),
    ],
)
def test_cli_refuses_non_finite_and_huge_numbers_before_loading_mnist(tmp_path, capsys, flags, message):
    out, no_mnist = tmp_path / "set", tmp_path / "no-mnist-here"
    assert main(["--out", str(out), "--mnist-root", str(no_mnist), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not out.exists() and not no_mnist.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{nope", "cannot be read as JSON"),
        ("[1.5, 2]", "expected a non-empty JSON list of whole numbers from 0 to 9999"),
        ('{"a": 1}', "expected a non-empty JSON list"),
        ("[99999999999999999999999]", "expected a non-empty JSON list"),
        ("[true]", "expected a non-empty JSON list"),
        ("[10000]", "indices into the 10000 MNIST test digits"),
        ("[]", "expected a non-empty JSON list"),
        (None, "cannot be read as JSON"),  # no such file
    ],
)
def test_cli_refuses_bad_digit_indices_naming_the_file(tmp_path, capsys, content, message):
    indices = tmp_path / "indices.json"
    if content is not None:
        indices.write_text(content)
    args = ["--out", str(tmp_path / "set"), "--split", "test", "--digit-indices", str(indices)]
    assert main([*args, "--mnist-root", str(tmp_path / "no-mnist-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --digit-indices {indices}") and message in err and err.count("\n") == 1
    assert not (tmp_path / "set").exists() and not (tmp_path / "no-mnist-here").exists()


def test_cli_refuses_a_negative_seed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--out", str(tmp_path / "set"), "--seed", "-1", "--mnist-root", str(tmp_path)])
    assert exit.value.code == 2 and "--seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()


def tiny_composites(count: int, label: str = "7") -> list[Composite]:
    return [Composite(image=np.full((96, 96), i, np.uint8), label=label, layout="row") for i in range(count)]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by path relative to it, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_refuses_an_out_it_would_damage_before_any_work(tmp_path, capsys):
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me too")
    write_dataset(tmp_path / "notes_and_data", tiny_composites(2), {})
    (tmp_path / "notes_and_data" / "README").write_text("mine")
    before = snapshot(tmp_path)
    for out, message in (
        ("a_file", "a_file is a file, where a folder is to be written"),
        ("a_file/set", "a_file is a file, not a folder"),
        ("notes", "notes is replaced whole when written, and it holds todo.txt besides images.npy"),
        ("notes_and_data", "notes_and_data is replaced whole when written, and it holds README besides"),
    ):
        args = ["--out", str(tmp_path / out), "--mnist-root", str(tmp_path / "no-mnist-here")]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before and not (tmp_path / "no-mnist-here").exists()


def full_disk_after(monkeypatch, target, name: str, calls: int) -> None:
    """From its calls-th call on, target.name writes part of its output and fails as a full disk does."""
    real, count = getattr(target, name), [0]

    def failing(*args, **kwargs):
        count[0] += 1
        if count[0] < calls:
            return real(*args, **kwargs)
        destination = next(a for a in args if isinstance(a, (str, Path)))
        Path(destination).write_bytes(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(target, name, failing)


@pytest.mark.parametrize("failing", ["images.npy", "preview.png"])
def test_write_dataset_is_whole_or_nothing_and_keeps_the_older_dataset(tmp_path, monkeypatch, failing):
    older = write_dataset(tmp_path / "set", tiny_composites(3, "12"), {"seed": 1})
    kept = snapshot(tmp_path)
    with monkeypatch.context() as patch:
        if failing == "images.npy":
            full_disk_after(patch, np, "save", 1)
        else:
            full_disk_after(patch, Image.Image, "save", 1)
        for folder in (older, tmp_path / "new" / "deeper" / "set"):
            with pytest.raises(OSError, match="No space left on device"):
                write_dataset(folder, tiny_composites(2), {"seed": 2})
    assert snapshot(tmp_path) == kept and sorted(os.listdir(tmp_path)) == ["set"], "no partial folder left"
    write_dataset(older, tiny_composites(2), {"seed": 2})  # once there is room, the new one replaces it
    images, _, metadata = read_dataset(older)
    assert len(images) == 2 and metadata["seed"] == 2 and sorted(os.listdir(tmp_path)) == ["set"]


@pytest.mark.parametrize("fault", ["disk full", "read-only folder"])
def test_cli_write_failure_is_one_line_exit_1_and_keeps_the_older_dataset(
    tmp_path, mnist_root, monkeypatch, capsys, fault
):
    out = write_dataset(tmp_path / "set", tiny_composites(3, "12"), {"seed": 1})
    kept = snapshot(tmp_path)
    if fault == "disk full":
        full_disk_after(monkeypatch, np, "save", 1)
        reason = "[Errno 28] No space left on device"
    else:

        def read_only(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Path, "mkdir", read_only)  # how making the staging folder fails there
        reason = "[Errno 13] Permission denied"
    args = ["--out", str(out), "--split", "test", "--num-images", "3", "--mnist-root", str(mnist_root)]
    assert main(args) == 1
    assert capsys.readouterr().err.endswith(f"error: writing {out} failed ({reason}); nothing was written there\n")
    assert snapshot(tmp_path) == kept and sorted(os.listdir(tmp_path)) == ["set"]


def test_staging_puts_everything_back_when_a_move_fails(tmp_path, monkeypatch):
    for name in ("a", "b"):
        write_dataset(tmp_path / name, tiny_composites(1), {"seed": 1})
    (tmp_path / "record.json").write_text("old")
    kept = snapshot(tmp_path)
    real_rename, renames = os.rename, []

    def rename(source, target):
        renames.append(source)
        if len(renames) == 4:  # a moved aside, the new a moved in, b moved aside: the new b fails to move in
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"), Staging() as staging:
        for name in ("a", "b"):
            (staging.folder(tmp_path / name, DATASET_FILES) / "images.npy").write_text("new")
        staging.file(tmp_path / "record.json").write_text("new")
    assert snapshot(tmp_path) == kept and sorted(os.listdir(tmp_path)) == ["a", "b", "record.json"]


def test_what_a_killed_writer_had_moved_aside_is_put_back_not_deleted(tmp_path):
    # Killed (kill -9) between moving the old dataset aside and moving the new one in: the old one
    # is the only copy. The next writer puts it back before it writes; if that write fails, it stays.
    write_dataset(tmp_path / "set", tiny_composites(2), {"seed": 1})
    old = snapshot(tmp_path / "set")
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "set").rename(tmp_path / f".set.partial-{killed.stdout.strip()}-0123abcd.older")
    with pytest.raises(RuntimeError, match="interrupted"), Staging() as staging:
        (staging.folder(tmp_path / "set", DATASET_FILES) / "images.npy").write_text("new")
        raise RuntimeError("interrupted")
    assert snapshot(tmp_path / "set") == old and os.listdir(tmp_path) == ["set"]


def test_written_folders_and_files_get_the_permissions_mkdir_and_open_would_give(tmp_path):
    previous = os.umask(0o027)
    try:
        with Staging() as staging:
            (staging.folder(tmp_path / "set", DATASET_FILES) / "images.npy").write_text("x")
            staging.file(tmp_path / "record.json").write_text("x")
        (tmp_path / "made-by-mkdir").mkdir()
        (tmp_path / "made-by-open.json").write_text("x")
    finally:
        os.umask(previous)
    mode = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert mode["set"] == mode["made-by-mkdir"] == 0o750, "others in the group can read a dataset"
    assert mode["record.json"] == mode["made-by-open.json"] == 0o640


# ---- the wider world training draws from


def test_nondigit_composites_hold_marks_and_read_as_nothing(mnist_test):
    composites = stressed(mnist_test, count=60, nondigit_share=1.0)
    assert {c.label for c in composites} == {""} and {c.layout for c in composites} == {"marks"}
    assert all(c.image.max() >= 128 for c in composites), "every mark is drawn in visible ink"
    assert all(not c.boxes and not c.sources for c in composites)


@pytest.mark.parametrize("kind", MARK_KINDS)
def test_every_kind_of_mark_stays_in_its_cell(kind):
    # Boxes as draw_mark_cell draws them: 20 of 28 px on the longer side, in a cell drawn 4x larger.
    for seed, (w, h) in enumerate([(80, 80), (80, 12), (56, 80), (80, 56)]):
        image = Image.new("L", (112, 112), 0)
        x0, y0 = (112 - w) / 2, (112 - h) / 2
        draw_mark(ImageDraw.Draw(image), kind, np.random.default_rng(seed), (x0, y0, x0 + w, y0 + h), width=8)
        ink = np.asarray(image) > 128
        assert ink.any() and not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any())


def test_no_mark_is_tall_and_narrow_as_a_1_or_a_0_is():
    for seed in range(300):
        ys, xs = np.nonzero(draw_mark_cell(np.random.default_rng(seed)) > 32)
        assert np.ptp(xs) + 1 >= 0.45 * (np.ptp(ys) + 1), f"seed {seed}"


def test_no_mark_is_a_loop_round_a_wide_hole_as_a_0_is(mnist_test):
    images, labels = mnist_test
    flagged = {d: np.mean([looks_like_a_zero(image) for image in images[labels == d][:300]]) for d in range(10)}
    assert flagged[0] > 0.6, "the check knows most written 0s"
    assert all(flagged[d] < 0.05 for d in range(1, 9)), flagged  # 9s, a loop on a stem, can be flagged
    assert not any(looks_like_a_zero(draw_mark_cell(np.random.default_rng(seed))) for seed in range(300))


@pytest.mark.parametrize("kind", MARK_KINDS)
def test_every_kind_of_mark_is_still_drawn_once_zeros_are_left_out(kind, monkeypatch):
    monkeypatch.setattr(marks_module, "MARK_KINDS", (kind,))
    rng = np.random.default_rng(0)
    kept = np.mean([not looks_like_a_zero(draw_one_mark_cell(rng)) for _ in range(100)])
    assert kept > 0.15, f"{kind}: {kept:.0%} of its marks kept"


def test_marks_are_drawn_with_the_strokes_of_digits_so_stroke_style_never_tells_them_apart(mnist_test):
    def full_ink_share(composites: list) -> float:
        ink = np.concatenate([c.image[c.image > 32] for c in composites])
        return float(np.mean(ink >= 250))

    digits, marks = stressed(mnist_test, count=30), stressed(mnist_test, count=30, nondigit_share=1.0)
    assert abs(full_ink_share(marks) - full_ink_share(digits)) < 0.1  # graded like MNIST's strokes
    pen_marks = stressed(mnist_test, count=30, nondigit_share=1.0, pen_share=1.0)
    assert full_ink_share(pen_marks) > full_ink_share(marks) + 0.2  # the pen redraws marks as it redraws digits


def test_overflow_composites_hold_one_or_two_digits_more_than_max_digits_all_labelled(mnist_test):
    _, test_labels = mnist_test
    composites = stressed(mnist_test, count=80, overflow_share=1.0)
    assert {len(c.label) for c in composites} == {5, 6}
    for c in composites:
        assert len(c.boxes) == len(c.label) and c.label == "".join(str(test_labels[i]) for i in c.sources)
        assert all(0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 for x0, y0, x1, y1 in c.boxes)
        for a, b in zip(c.boxes, c.boxes[1:]):  # in reading order
            assert a[0] + a[2] <= b[0] + b[2]


def test_wide_digit_heights_shrink_to_fit_crowded_canvases(mnist_test):
    composites = stressed(mnist_test, count=120, digit_height=(14, 40), overflow_share=0.3)
    heights = {len(c.label): [y1 - y0 for _, y0, _, y1 in c.boxes] for c in composites}
    assert max(heights[1]) > 34 and max(heights[6]) < max(heights[1])  # alone a digit may be tall, crowded it may not
    assert all(x0 >= 0 and x1 <= 96 and y0 >= 0 and y1 <= 96 for c in composites for x0, y0, x1, y1 in c.boxes)


def test_touching_rows_bring_neighbouring_digits_together(mnist_test):
    composites = stressed(mnist_test, count=60, layout="row", touching_share=1.0, min_digits=2)
    gaps = [b[0] - a[2] for c in composites for a, b in zip(c.boxes, c.boxes[1:])]
    assert max(gaps) <= 0 and min(gaps) >= -4  # ink boxes meet or overlap by a few pixels, never apart


def test_pen_redrawn_digits_have_even_full_strokes_whose_width_follows_the_pen(mnist_test):
    from augment import redraw_with_pen

    digit = mnist_test[0][0]
    thin, thick = redraw_with_pen(digit, 1), redraw_with_pen(digit, 4)
    assert thin.dtype == np.uint8 and thin.max() == 255
    assert (thick > 128).sum() > 1.8 * (thin > 128).sum()  # a broader pen lays down more ink
    # Inside the strokes the ink is as bright as the pen, unlike MNIST's graded strokes.
    assert np.median(thin[thin > 0]) == 255 and np.median(digit[digit > 0]) < 255


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_a_dot_drawn_with_the_round_pen_is_a_disc_of_its_radius_even_at_the_border(radius):
    from augment import draw_with_round_pen

    dot = np.zeros((15, 15), bool)
    dot[7, 7] = dot[0, 0] = True
    drawn = draw_with_round_pen(dot, radius)
    y, x = np.mgrid[:15, :15]
    within = radius * radius + radius
    discs = ((y - 7) ** 2 + (x - 7) ** 2 <= within) | (y**2 + x**2 <= within)
    np.testing.assert_array_equal(drawn, discs)


def test_the_skeleton_of_a_bar_is_its_centre_line():
    from augment import morphological_skeleton

    bar = np.zeros((9, 20), bool)
    bar[2:7, 3:17] = True  # five pixels thick: two erosions leave its centre row
    skeleton = morphological_skeleton(bar)
    assert skeleton[4, 5:15].all() and not skeleton[[2, 3, 5, 6], 5:15].any()
    assert not (skeleton & ~bar).any()
    assert morphological_skeleton(np.ones((6, 6), bool)).any(), "ink to the very border thins too"


def test_paper_noise_dirties_the_paper_but_not_the_label(mnist_test):
    composites = stressed(mnist_test, count=40, min_digits=0, max_digits=0, paper_noise=1.0)
    assert {c.label for c in composites} == {""}
    assert sum(c.image.max() > 0 for c in composites) >= 35, "nearly every sheet has some grey, a line or a speck"


def test_the_wider_world_options_leave_default_composites_unchanged(mnist_test):
    images, labels = mnist_test
    plain = MultiDigitComposer(images, labels, augment_strength=0.0)
    explicit = MultiDigitComposer(
        images,
        labels,
        augment_strength=0.0,
        pen_share=0.0,
        paper_noise=0.0,
        nondigit_share=0.0,
        overflow_share=0.0,
        elastic_share=0.0,
    )
    for i in range(20):
        a, b = plain.compose(np.random.default_rng([1, i])), explicit.compose(np.random.default_rng([1, i]))
        assert a.label == b.label and np.array_equal(a.image, b.image)


def test_a_digit_too_faint_to_redraw_with_a_pen_keeps_its_own_strokes(mnist_test):
    # Thinning finds no centre line in ink this faint: a pen would draw nothing, and a tilted row
    # of nothing has no ink box (training once stopped on it).
    images, labels = mnist_test
    faint = images[:50] // 5
    composer = MultiDigitComposer(faint, labels[:50], pen_share=1.0, row_tilt=10.0, layout="row", min_digits=1)
    for c in generate(composer, 30, seed=0, progress=False):
        assert all(c.image[y0:y1, x0:x1].max() > 0 for x0, y0, x1, y1 in c.boxes)


def test_elastic_distortion_bends_strokes_without_breaking_or_losing_them(mnist_test):
    images, _ = mnist_test
    rng = np.random.default_rng(0)
    ink_ratios, box_moves = [], []
    for digit in images[:40]:
        bent = elastic_distort(digit, rng)
        assert bent.dtype == np.uint8 and bent.shape == digit.shape and not np.array_equal(bent, digit)
        ink_ratios.append(bent.sum() / digit.sum())
        box_moves.append(max(abs(a - b) for a, b in zip(ink_box(digit), ink_box(bent))))
    # The ink moves but stays: stretched here, squeezed there, as much of it on average, near where it was.
    assert min(ink_ratios) > 0.6 and max(ink_ratios) < 1.6 and 0.9 < np.mean(ink_ratios) < 1.1
    assert np.median(box_moves) <= 3 and max(box_moves) <= 8
    again = elastic_distort(images[0], np.random.default_rng(1))
    assert np.array_equal(again, elastic_distort(images[0], np.random.default_rng(1)))  # one seed, one bend


def test_elastic_share_bends_that_share_of_training_digits(mnist_test):
    images, labels = mnist_test
    kept, bent = (MultiDigitComposer(images, labels, min_digits=1, elastic_share=share) for share in (0.0, 1.0))
    different = sum(
        not np.array_equal(
            kept.compose(np.random.default_rng([2, i])).image, bent.compose(np.random.default_rng([2, i])).image
        )
        for i in range(10)
    )
    assert different == 10
    assert bent.settings()["elastic_share"] == 1.0
    with pytest.raises(ValueError, match="elastic_share must be 0 to 1"):
        MultiDigitComposer(images, labels, elastic_share=1.5)
