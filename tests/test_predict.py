import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

import predict
from multidigit_generator import MultiDigitComposer, generate
from predict import main, open_image, to_canvas

# The model card reports the shipped model's test accuracy; this is a floor well inside it,
# so that 500 images' sampling noise never trips it but a broken or swapped model does.
SHIPPED_MIN_ACCURACY = 0.93  # measured: 97.3 % on 10,000 test composites (500 images: sd ~0.8 points)


@pytest.fixture(scope="module")
def composite(mnist_test):
    images, labels = mnist_test
    # Composed as the evaluation sets are: the digits as written, no augmentation.
    composer = MultiDigitComposer(images, labels, min_digits=3, max_digits=3, layout="row", augment_strength=0.0)
    return composer.compose(np.random.default_rng(0))


def test_a_dataset_image_reaches_the_model_unchanged(composite):
    assert composite.image.max() == 255
    assert np.array_equal(to_canvas(Image.fromarray(composite.image), 96), composite.image)


def test_dark_ink_on_light_paper_is_inverted_and_fitted_keeping_aspect_ratio(composite):
    paper = Image.fromarray(255 - composite.image).resize((400, 400)).convert("RGB")
    wide = Image.new("RGB", (800, 400), "white")
    wide.paste(paper, (200, 0))
    canvas = to_canvas(wide, 96)
    # 800x400 becomes 96x48, centred: rows 0-23 and 72-95 are black, the ink is in the band.
    assert canvas[:24].max() == 0 and canvas[72:].max() == 0
    band = np.asarray(Image.fromarray(composite.image).resize((48, 48)), dtype=float)
    assert np.corrcoef(canvas[24:72, 24:72].ravel(), band.ravel())[0, 1] > 0.9


def test_scanned_pages_lose_their_noise_and_are_read(mnist_test):
    # Grey paper, blur, sensor noise and JPEG (the scanner stress set's degradation): the
    # canvas must be exact black away from the ink, and the shipped model must read it.
    images, labels = mnist_test
    composer = MultiDigitComposer(images, labels, augment_strength=0.0, scan_degradation=True)
    composites = generate(composer, 200, seed=4242, progress=False)
    canvases = [to_canvas(Image.fromarray(c.image), 96) for c in composites]
    for c, canvas in zip(composites, canvases):
        far_from_ink = np.ones((96, 96), dtype=bool)
        for x0, y0, x1, y1 in c.boxes:
            far_from_ink[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] = False
        assert (canvas[far_from_ink] <= 16).mean() > 0.99, "background noise survived preprocessing"
    readings = predict.read_canvases(predict.load_model(predict.DEFAULT_CHECKPOINT), canvases)
    correct = sum(r.digits == c.label for r, c in zip(readings, composites))
    assert correct / len(composites) >= 0.8, f"{correct} of {len(composites)} scanned composites read exactly"  # measured: 91.7 % of 2,000


@pytest.mark.parametrize("stroke", ["black", "white", "blue"])
def test_strokes_on_a_transparent_pad_become_white_ink(stroke):
    pad = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    ImageDraw.Draw(pad).line([(150, 60), (150, 240)], fill=stroke, width=20)
    canvas = to_canvas(pad, 96)
    assert canvas[48, 48] > 200 and canvas[48, 10] == 0 and canvas[5, 48] == 0


def test_unreadable_and_oversized_files_raise_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="cannot read image"):
        open_image(tmp_path / "junk.png")
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(predict, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ValueError, match="pixel limit"):
        open_image(tmp_path / "big.png")


def test_predict_cli_reads_good_files_and_reports_bad_ones(tmp_path, tiny_run, composite, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(composite.image).save(folder / "a_gray.png")
    Image.fromarray(255 - composite.image).convert("RGB").resize((150, 120)).save(folder / "b_paper.jpg")
    rgba = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    rgba.putalpha(Image.fromarray(composite.image))
    rgba.save(folder / "c_alpha.png")
    Image.new("RGB", (64, 64), "white").save(folder / "d_blank.png")
    (folder / "e_corrupt.png").write_bytes(b"garbage")
    (folder / "notes.txt").write_text("not an image, and not a picture suffix: skipped")
    code = main(["--checkpoint", str(tiny_run / "best.pt"), str(folder), str(tmp_path / "missing.png")])
    out, err = capsys.readouterr()
    assert code == 1
    lines = dict(line.split("\t") for line in out.splitlines())
    assert set(lines) == {str(folder / n) for n in ("a_gray.png", "b_paper.jpg", "c_alpha.png", "d_blank.png")}
    assert all(re.fullmatch(r"\d{0,4}", v) for v in lines.values())  # the tiny model may read nothing yet
    assert lines[str(folder / "d_blank.png")] == ""
    assert "e_corrupt.png: error: cannot read image" in err and "missing.png: error: no such file" in err


def test_predict_cli_jsonl(tmp_path, tiny_run, composite, capsys):
    Image.fromarray(composite.image).save(tmp_path / "x.png")
    Image.new("L", (96, 96)).save(tmp_path / "blank.png")
    assert main(["--checkpoint", str(tiny_run / "best.pt"), "--jsonl", "--beam-size", "3",
                 str(tmp_path / "x.png"), str(tmp_path / "gone.png"), str(tmp_path / "blank.png")]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [str(tmp_path / n) for n in ("x.png", "gone.png", "blank.png")]  # input order
    assert rows.pop(1) == {"path": str(tmp_path / "gone.png"), "error": "no such file"}
    assert 0 < rows[0]["confidence"] <= 1 and len(rows[0]["digit_probs"]) == len(rows[0]["digits"])
    assert rows[1] == {"path": str(tmp_path / "blank.png"), "digits": "", "confidence": 1.0, "digit_probs": []}


def test_missing_or_foreign_checkpoint_is_reported(tmp_path, capsys):
    Image.new("L", (96, 96)).save(tmp_path / "x.png")
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), str(tmp_path / "x.png")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(tmp_path / "foreign.pt"), str(tmp_path / "x.png")]) == 2
    assert "not a usable digit-sequence checkpoint" in capsys.readouterr().err


def test_shipped_model_reads_fresh_test_composites(mnist_test):
    # The committed checkpoint, on composites it has never seen (MNIST test digits, a seed used
    # nowhere else), through the same path as `predict.py` minus the file reading.
    model = predict.load_model(predict.DEFAULT_CHECKPOINT)
    images, labels = mnist_test
    composer = MultiDigitComposer(images, labels, augment_strength=0.0)  # as the test set is composed
    composites = generate(composer, 500, seed=31337, progress=False)
    readings = predict.read_canvases(model, [c.image for c in composites])
    correct = sum(r.digits == c.label for r, c in zip(readings, composites))
    assert correct / len(composites) >= SHIPPED_MIN_ACCURACY, f"{correct} of {len(composites)} read exactly"
