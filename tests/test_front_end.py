"""The Streamlit front end: in-process with Streamlit's AppTest, and end to end in headless
Chromium, drawing with the mouse on a running `streamlit run front_end.py`."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest

import predict
from drawing import number_strokes, scribble_strokes
from multidigit_generator import MultiDigitComposer
from split_multidigit_dataset import EVAL_COMPOSER

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "front_end.py")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRAW_HINT = "Draw some digits: up to four, in a row or anywhere on the pad."


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digits_read(at: AppTest) -> str | None:
    """The digits the page shows in large type, or None if it shows none."""
    for markdown in at.markdown:
        match = re.search(r'class="digits-read"[^>]*>(\d*)<', markdown.value)
        if match:
            return match.group(1)
    return None


def image_captions(at: AppTest) -> list[str]:
    return [caption for element in at.get("image") for caption in element.captions]


@pytest.fixture
def app(monkeypatch, mnist_root) -> AppTest:
    monkeypatch.setenv("MNIST_ROOT", str(mnist_root))  # for the random example
    monkeypatch.chdir(REPO)  # the default checkpoint path is relative to the repository, as for a user
    return AppTest.from_file(APP, default_timeout=60).run()


def infos(at: AppTest) -> list[str]:
    return [info.value for info in at.info]


def upload(at: AppTest, name: str, content: bytes) -> AppTest:
    at.radio[0].set_value("Upload an image").run()
    at.file_uploader[0].upload(name, content, "image/png")
    return at.run()


def test_the_page_opens_on_an_empty_pad_and_asks_for_digits(app):
    assert not app.exception
    assert infos(app) == [DRAW_HINT]
    assert digits_read(app) is None
    assert app.slider[0].label == "Pen width" and not app.sidebar.slider  # beside the pad: a phone hides the sidebar
    assert app.sidebar.text_input[0].value == "checkpoints/digit_transformer.pt"


def test_an_uploaded_composite_is_read_with_a_confidence_and_attention_map_per_digit(app, composite):
    at = upload(app, "number.png", png_bytes(Image.fromarray(255 - composite.image)))  # dark ink on white paper
    assert not at.exception and not at.error
    assert digits_read(at) == composite.label
    captions = image_captions(at)
    assert "What the model sees (96x96)" in captions
    per_digit = [c for c in captions if re.fullmatch(r"\d: (\d+\.\d|>99\.9)% sure", c)]
    assert [c[0] for c in per_digit] == list(composite.label)  # one attention map per digit, in reading order
    assert any(re.fullmatch(r"Whole reading (\d+\.\d|>99\.9)% sure\. Read in \d+ ms\.", c.value) for c in at.caption)


def fake_reading(monkeypatch, reading: predict.Reading) -> None:
    """The page reads `reading` whatever the image: the page's own logic, whatever the model knows."""

    def read_canvases(model, canvases, **options):
        maps = np.zeros((len(reading.digits), *canvases[0].shape), np.float32)
        return [predict.Reading(**{**reading.__dict__, "attention": maps})]

    monkeypatch.setattr(predict, "read_canvases", read_canvases)  # the page imports it on each run


def test_an_unsure_reading_says_not_sure_and_lists_the_alternatives(app, composite, monkeypatch):
    alternatives = [("71", False, 0.31), ("", False, 0.12), ("7123", True, 0.05), ("1", False, 0.01)]
    fake_reading(monkeypatch, predict.Reading("71", [0.9996, 0.62], 0.31, unsure=True, alternatives=alternatives))
    at = upload(app, "number.png", png_bytes(Image.fromarray(composite.image)))
    assert not at.exception and not at.error
    assert digits_read(at) is None  # no reading in large type that looks certain
    assert any('class="not-sure"' in m.value and "Not sure" in m.value for m in at.markdown)
    listed = next(m.value for m in at.markdown if m.value.startswith("Most probable readings"))
    assert listed.splitlines()[1:] == [  # the top three
        "- **71**: 31.0%",
        "- *nothing*: 12.0%",
        "- **7123** and more (more than 4 digits): 5.0%",
    ]
    assert "1: 62.0% sure" in image_captions(at) and "7: >99.9% sure" in image_captions(at)  # never "100.0%"
    # beside the whole reading's 31.0 %, one line says why the digits' figures are higher
    assert any("nothing else written" in c.value for c in at.caption)
    assert any("looked at while it wrote each digit" in c.value for c in at.caption)  # what the maps are


def test_more_digits_than_the_model_reads_are_flagged_with_the_first_digits(app, composite, monkeypatch):
    fake_reading(monkeypatch, predict.Reading("2026", [0.99] * 4, 0.93, too_many=True))
    at = upload(app, "number.png", png_bytes(Image.fromarray(composite.image)))
    assert not at.exception and digits_read(at) == "2026"
    assert "more than 4 digits" in at.warning[0].value and "2026" in at.warning[0].value


@pytest.mark.parametrize("mark", ["nothing", "a dot"])
def test_a_blank_or_dotted_image_gets_the_hint_not_a_guess(app, mark):
    paper = Image.new("RGB", (640, 320), "white")
    if mark == "a dot":
        ImageDraw.Draw(paper).ellipse((300, 150, 316, 166), fill="black")  # a tap of a 16 px pen
    at = upload(app, "blank.png", png_bytes(paper))
    assert not at.exception and digits_read(at) is None
    assert infos(at) == ["There is no ink in this image (or only a dot): nothing to read."]


def decompression_bomb(width: int, height: int) -> bytes:
    """A real bomb: a black 1-bit PNG, a few hundred KB on disk that decode to width x height
    pixels (a gigabyte as the greyscale the model would need for 30000 x 30000)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # bit depth 1, greyscale
    rows = zlib.compress((b"\x00" * (1 + (width + 7) // 8)) * height, 9)  # each row: filter byte + zero bits
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_an_upload_with_no_file_asks_for_one_not_for_drawing(app):
    at = app.radio[0].set_value("Upload an image").run()
    assert infos(at) == ["Upload a picture of up to four digits: PNG, JPEG, BMP, GIF, WebP or TIFF."]


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n not really a png", b"shopping list: milk, eggs\n"])
def test_files_that_are_not_images_are_refused_in_plain_words(app, content):
    at = upload(app, "junk.png", content)
    assert not at.exception and digits_read(at) is None
    assert [e.value for e in at.error] == [
        "junk.png is not an image that can be read (PNG, JPEG, BMP, GIF, WebP or TIFF), or it is damaged."
    ]


@pytest.mark.parametrize("width, height", [(8_000, 6_000), (30_000, 30_000)])  # over our limit; over Pillow's too
def test_decompression_bombs_are_refused_with_a_message(app, width, height):
    bomb = decompression_bomb(width, height)
    assert len(bomb) < 1_000_000
    at = upload(app, "bomb.png", bomb)
    assert not at.exception and digits_read(at) is None
    assert re.fullmatch(r"bomb\.png: image is (\d+x\d+, )?over the 40,000,000-pixel limit\.", at.error[0].value)


def test_the_random_example_comes_with_the_button_and_shows_its_true_digits_and_the_reading(app):
    at = app.radio[0].set_value("Random example").run()
    assert infos(at) == ["Press *New random example* for a composite of MNIST test digits, with its true digits."]
    at = at.button[0].click().run()  # "New random example"
    assert not at.exception and "Composed from MNIST test digits" in image_captions(at)
    at.session_state["example_seed"] = 7  # one with digits, the same every time
    at = at.run()
    assert not at.exception and not at.error and not at.info
    truth = next(c.value for c in at.caption if c.value.startswith("True digits: ")).removeprefix("True digits: ")
    whole = next(c.value for c in at.caption if c.value.startswith("Whole reading"))
    read = digits_read(at)  # None if the model is not sure: the verdict is on its reading all the same
    assert re.search(r" - (right|wrong, the truth is \S+)\. Read in", whole)
    if read is not None:
        assert ("- right" if read == truth else f"- wrong, the truth is {truth}") in whole
    at = at.button[0].click().run()
    assert at.session_state["example_seed"] != 7  # another one


def test_a_blank_random_example_says_so_not_draw_some_digits(app, mnist_test):
    composer = MultiDigitComposer(*mnist_test, canvas_size=96, **EVAL_COMPOSER)
    seed = next(s for s in range(1000) if composer.compose(np.random.default_rng(s)).label == "")
    app.session_state["example_seed"] = seed
    at = app.radio[0].set_value("Random example").run()
    assert not at.exception and digits_read(at) is None
    assert infos(at) == ["This example is a blank canvas: there is nothing to read, and the model reads nothing."]


def test_a_missing_or_foreign_checkpoint_is_explained(app, tmp_path):
    at = app.sidebar.text_input[0].set_value(str(tmp_path / "nowhere.pt")).run()
    assert not at.exception and at.error[0].value.startswith(f"no checkpoint at {tmp_path / 'nowhere.pt'}")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    at = at.sidebar.text_input[0].set_value(str(tmp_path / "foreign.pt")).run()
    assert not at.exception and "is not a digit-sequence checkpoint" in at.error[0].value
    assert not at.radio  # nothing else is offered without a model


def test_the_server_is_local_only_and_uploads_are_capped():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost"
    assert 1 <= config["server"]["maxUploadSize"] <= 10  # MB
    assert config["browser"]["gatherUsageStats"] is False


# ---- end to end in a real browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# The browser tests share one server and one Chromium: on one worker, not one each.
BROWSER = pytest.mark.xdist_group("browser")


@pytest.fixture(scope="module")
def streamlit_server():
    """`streamlit run front_end.py` on a free localhost port, as a user starts it."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "front_end.py",
            "--server.port",
            str(port),
            "--server.headless",
            "true",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    pytest.fail(f"streamlit did not start:\n{server.stdout.read()}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            # No sandbox (CI runs as root) and no calls home: the machine has no network.
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-quic",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser
        finally:
            browser.close()


def open_pad(chromium, url: str, width: int, height: int):
    """A fresh page (its own session) at that viewport, once the pad is up: (page, the pad's box)."""
    from playwright.sync_api import expect

    page = chromium.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    pad = page.locator("canvas.upper-canvas")  # Fabric.js draws on the canvas above the picture
    pad.wait_for(timeout=60_000)
    expect(page.get_by_text("Draw some digits")).to_be_visible()
    return page, pad


def pad_box(pad) -> dict | None:
    """The pad's box, or None while the pad is being replaced by one of the column's width (for a
    moment there is no pad, or the old and the new one both)."""
    from playwright.sync_api import Error

    try:
        return pad.bounding_box(timeout=1000)
    except Error:
        return None


def settled_pad_box(pad, seconds: float = 10) -> dict | None:
    """The pad's box once the pad has settled (one pad, the same box twice half a second apart):
    after Clear, or a change of width, the page puts a new pad in the old one's place, and
    strokes drawn in between are lost with the old one."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        box = pad_box(pad)
        if box is not None and box == last:
            return box
        last = box
        time.sleep(0.5)
    return last


def draw(page, box: dict, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw with the mouse, stroke by stroke, at pad coordinates."""
    for stroke in strokes:
        page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=3)
        page.mouse.up()


@BROWSER
def test_drawing_with_the_mouse_reads_2026_on_a_wide_page_and_206_on_a_phone_wide_one(
    streamlit_server, chromium, tmp_path
):
    from playwright.sync_api import expect

    page, pad = open_pad(chromium, streamlit_server, 1400, 1200)  # one page for both widths: each costs a session
    try:
        assert pad.bounding_box()["width"] == 640  # a wide column gets the widest pad
        draw(page, pad.bounding_box(), number_strokes("2026", left=30, top=60, height=180))
        expect(page.locator(".digits-read")).to_have_text("2026", timeout=30_000)
        expect(page.get_by_text("2: ", exact=False).first).to_be_visible()
        screenshot = Path(os.environ.get("FRONT_END_SCREENSHOT", tmp_path / "front_end.png"))
        page.screenshot(path=screenshot, full_page=True)
        print(f"drew 2026, read 2026; screenshot: {screenshot}")
        page.get_by_role("button", name="Clear the pad").click()
        expect(page.get_by_text("Draw some digits")).to_be_visible(timeout=30_000)
        expect(page.locator(".digits-read")).to_have_count(0)

        page.set_viewport_size({"width": 400, "height": 800})  # a phone
        deadline = time.monotonic() + 10  # the page learns the column's width from the browser, then fits the pad
        while time.monotonic() < deadline:
            box = pad_box(pad)
            if box is not None and box["x"] + box["width"] <= 400:
                break
            time.sleep(0.2)
        box = settled_pad_box(pad)  # the narrow pad may still be replacing the wide one
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 400  # no part of it off the screen
        assert box["width"] >= 300  # nor much narrower than the column
        expect(page.get_by_text("Pen width")).to_be_visible()  # on the page, not in the sidebar a phone hides
        height = box["height"] * 0.6
        strokes = number_strokes("206", left=(box["width"] - 2.4 * height) / 2, top=box["height"] * 0.2, height=height)
        draw(page, box, strokes)
        expect(page.locator(".digits-read")).to_have_text("206", timeout=30_000)
        # to another source and back: the drawing and its reading are still there
        page.get_by_text("Upload an image").click()
        expect(page.locator(".digits-read")).to_have_count(0, timeout=30_000)
        page.get_by_text("Draw", exact=True).click()
        expect(page.locator(".digits-read")).to_have_text("206", timeout=30_000)
    finally:
        page.close()


@BROWSER
def test_a_scribble_is_not_read_as_confident_digits_and_five_digits_get_the_overflow_notice(streamlit_server, chromium):
    from playwright.sync_api import expect

    page, pad = open_pad(chromium, streamlit_server, 1400, 1200)  # one page for both: each page costs a session
    try:
        draw(page, pad.bounding_box(), scribble_strokes(left=220, top=50, size=200))
        verdict = page.locator(".not-sure").or_(page.get_by_text("The model found no digits here"))
        expect(verdict.first).to_be_visible(timeout=30_000)
        expect(page.locator(".digits-read")).to_have_count(0)
        page.get_by_role("button", name="Clear the pad").click()
        expect(page.get_by_text("Draw some digits")).to_be_visible(timeout=30_000)
        draw(
            page,
            settled_pad_box(pad),
            number_strokes("20262", left=20, top=90, height=130),
        )
        expect(page.get_by_text("There are more than 4 digits here", exact=False)).to_be_visible(timeout=30_000)
    finally:
        page.close()
