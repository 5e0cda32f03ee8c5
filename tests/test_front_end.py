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

import pytest
import torch
from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest

from drawing import number_strokes

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "front_end.py")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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


def upload(at: AppTest, name: str, content: bytes) -> AppTest:
    at.radio[0].set_value("Upload an image").run()
    at.file_uploader[0].upload(name, content, "image/png")
    return at.run()


def test_the_page_opens_on_an_empty_pad_and_asks_for_digits(app):
    assert not app.exception
    assert [info.value for info in app.info] == ["Draw some digits: up to four, in a row or anywhere on the pad."]
    assert digits_read(app) is None
    assert app.sidebar.text_input[0].value == "checkpoints/digit_transformer.pt"


def test_an_uploaded_composite_is_read_with_a_confidence_and_attention_map_per_digit(app, composite):
    at = upload(app, "number.png", png_bytes(Image.fromarray(255 - composite.image)))  # dark ink on white paper
    assert not at.exception and not at.error
    assert digits_read(at) == composite.label
    captions = image_captions(at)
    assert "What the model sees (96x96)" in captions
    per_digit = [c for c in captions if re.fullmatch(r"\d: \d+\.\d% sure", c)]
    assert [c[0] for c in per_digit] == list(composite.label)  # one attention map per digit, in reading order
    assert re.search(r"Read in \d+ ms", at.caption[0].value)


@pytest.mark.parametrize("mark", ["nothing", "a dot"])
def test_a_blank_or_dotted_image_gets_the_hint_not_a_guess(app, mark):
    paper = Image.new("RGB", (640, 320), "white")
    if mark == "a dot":
        ImageDraw.Draw(paper).ellipse((300, 150, 316, 166), fill="black")  # a tap of a 16 px pen
    at = upload(app, "blank.png", png_bytes(paper))
    assert not at.exception and digits_read(at) is None
    assert [info.value for info in at.info] == ["Draw some digits: up to four, in a row or anywhere on the pad."]


def decompression_bomb(width: int, height: int) -> bytes:
    """A real bomb: a black 1-bit PNG, a few hundred KB on disk that decode to width x height
    pixels (a gigabyte as the greyscale the model would need for 30000 x 30000)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # bit depth 1, greyscale
    rows = zlib.compress((b"\x00" * (1 + (width + 7) // 8)) * height, 9)  # each row: filter byte + zero bits
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_corrupt_files_are_refused_with_a_message(app):
    at = upload(app, "junk.png", b"\x89PNG\r\n\x1a\n not really a png")
    assert not at.exception and digits_read(at) is None
    assert at.error[0].value.startswith("junk.png: cannot read image")


@pytest.mark.parametrize("width, height", [(8_000, 6_000), (30_000, 30_000)])  # over our limit; over Pillow's too
def test_decompression_bombs_are_refused_with_a_message(app, width, height):
    bomb = decompression_bomb(width, height)
    assert len(bomb) < 1_000_000
    at = upload(app, "bomb.png", bomb)
    assert not at.exception and digits_read(at) is None
    assert (
        at.error[0].value.startswith("bomb.png: image is ") and "over the 40,000,000-pixel limit" in at.error[0].value
    )


def test_the_random_example_shows_its_true_digits_and_the_reading(app):
    app.session_state["example_seed"] = 7
    at = app.radio[0].set_value("Random example").run()
    assert not at.exception and not at.error
    truth = next(c.value for c in at.caption if c.value.startswith("True digits: ")).removeprefix("True digits: ")
    read = digits_read(at)
    assert read is not None and at.caption[-1].value.startswith("Whole reading")
    verdict = "- right" if read == truth else f"- wrong, the truth is {truth}"  # whatever this model reads
    assert verdict in at.caption[-1].value
    at = at.button[0].click().run()  # "New example" draws another seed
    assert at.session_state["example_seed"] != 7


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


@pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)"
)
def test_drawing_2026_with_the_mouse_in_chromium_reads_2026(streamlit_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

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
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(streamlit_server)
            pad = page.locator("canvas.upper-canvas")  # Fabric.js draws on the canvas above the picture
            pad.wait_for(timeout=60_000)
            expect(page.get_by_text("Draw some digits")).to_be_visible()
            origin = pad.bounding_box()
            for stroke in number_strokes("2026", left=30, top=60, height=180):
                page.mouse.move(origin["x"] + stroke[0][0], origin["y"] + stroke[0][1])
                page.mouse.down()
                for x, y in stroke[1:]:
                    page.mouse.move(origin["x"] + x, origin["y"] + y, steps=3)
                page.mouse.up()
            expect(page.locator(".digits-read")).to_have_text("2026", timeout=30_000)
            expect(page.get_by_text("2: ", exact=False).first).to_be_visible()
            screenshot = Path(os.environ.get("FRONT_END_SCREENSHOT", tmp_path / "front_end.png"))
            page.screenshot(path=screenshot, full_page=True)
            print(f"drew 2026, read 2026; screenshot: {screenshot}")
            page.get_by_role("button", name="Clear the pad").click()
            expect(page.get_by_text("Draw some digits")).to_be_visible(timeout=30_000)
            expect(page.locator(".digits-read")).to_have_count(0)
        finally:
            browser.close()
