"""Drawing pad: write a few digits with the mouse and watch the model read them.

    uv run streamlit run front_end.py

Three ways in: draw on the pad, upload an image, or ask for a random composite of MNIST test
digits (its true digits are shown). Every image goes through predict.py's preprocessing
(to_canvas: ink found and made white on black, digits scaled to the height the model was
trained on, centred), and the page shows what the model sees, the digits it read with a
confidence for each, and where it looked for each digit (decoder cross-attention over the
image patches). A blank pad, or one with only a dot on it, is not read.

Runs offline and sends nothing anywhere: the server listens on localhost only and uploads are
capped (.streamlit/config.toml); wandb is not involved.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import streamlit as st
import torch
from PIL import Image

from model import DEFAULT_CHECKPOINT, CheckpointError, DigitSequenceTransformer, load_model
from multidigit_generator import MnistUnavailableError, MultiDigitComposer, default_mnist_root, load_mnist
from predict import BLANK_INK_LEVEL, IMAGE_SUFFIXES, open_image, read_canvases, to_canvas
from split_multidigit_dataset import EVAL_COMPOSER

PAD_WIDTH, PAD_HEIGHT = 640, 320  # drawing pad, in screen pixels
VIEW_SIZE = 192  # screen pixels per side for the model's canvas and the attention maps
SOURCES = ("Draw", "Upload an image", "Random example")
DRAW_HINT = "Draw some digits: up to four, in a row or anywhere on the pad."


@st.cache_resource(show_spinner="Loading the model ...")
def cached_model(path: str, modified: float) -> DigitSequenceTransformer:
    """The model, loaded once per checkpoint file version (modified: its mtime, so that a
    retrained file is picked up)."""
    return load_model(path)


@st.cache_resource(show_spinner="Loading MNIST test digits ...")
def cached_composer(mnist_root: str, canvas_size: int) -> MultiDigitComposer:
    images, labels = load_mnist(mnist_root, train=False)
    return MultiDigitComposer(images, labels, canvas_size=canvas_size, **EVAL_COMPOSER)


def drawing_pad(pen_width: int) -> Image.Image | None:
    # Imported here: the component registers itself with the running app on import, which
    # fails anywhere else (a test, or `import front_end`).
    from streamlit_drawable_canvas import st_canvas

    if st.button("Clear the pad"):
        st.session_state.pad_version = st.session_state.get("pad_version", 0) + 1
    # A new key is a new, empty pad; the drawing's own toolbar also has undo, redo and reset.
    result = st_canvas(
        stroke_width=pen_width,
        stroke_color="#000000",
        background_color="#ffffff",
        width=PAD_WIDTH,
        height=PAD_HEIGHT,
        return_image_data=True,
        key=f"pad-{st.session_state.get('pad_version', 0)}",
    )
    data = result.image_data
    return None if data is None else Image.fromarray(data)


def uploaded_image() -> Image.Image | None:
    upload = st.file_uploader("An image of up to four digits", type=sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
    if upload is None:
        return None
    try:
        image = open_image(io.BytesIO(upload.getvalue()))
    except ValueError as error:
        st.error(f"{upload.name}: {error}")
        return None
    preview = image.convert("RGBA")  # any mode predict reads (16-bit, palette, ...) shows
    preview.thumbnail((2 * VIEW_SIZE, 2 * VIEW_SIZE))  # a photo's megapixels need not travel to the browser
    st.image(preview, caption=f"{upload.name} ({image.width}x{image.height})")
    return image


def random_example(canvas_size: int) -> tuple[Image.Image | None, str | None]:
    if st.button("New example") or "example_seed" not in st.session_state:
        st.session_state.example_seed = int(np.random.default_rng().integers(2**31))
    try:
        composer = cached_composer(default_mnist_root(), canvas_size)
    except MnistUnavailableError as error:
        st.error(str(error))
        return None, None
    composite = composer.compose(np.random.default_rng(st.session_state.example_seed))
    st.image(upscale(composite.image), caption="Composed from MNIST test digits")
    st.caption(f"True digits: {composite.label or '(none)'}")
    return Image.fromarray(composite.image), composite.label


def upscale(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(canvas).resize((VIEW_SIZE, VIEW_SIZE), Image.NEAREST)


def attention_overlay(canvas: np.ndarray, attention: np.ndarray) -> Image.Image:
    """The canvas in grey, tinted red where the model looked; the strokes stay visible."""
    grey = canvas.astype(np.float32) / 255 * 0.8
    heat = attention.astype(np.float32) * 0.7
    rgb = np.stack([grey + heat * (1 - grey), grey * (1 - heat), grey * (1 - heat)], axis=-1)
    return upscale(np.round(rgb * 255).astype(np.uint8))


def show_reading(model: DigitSequenceTransformer, image: Image.Image, truth: str | None) -> None:
    started = time.perf_counter()
    canvas = to_canvas(image, model.config.image_size)
    left, right = st.columns([1, 2])
    left.image(upscale(canvas), caption=f"What the model sees ({canvas.shape[1]}x{canvas.shape[0]})")
    if canvas.max() < BLANK_INK_LEVEL:
        right.info(DRAW_HINT)
        return
    reading = read_canvases(model, [canvas], attention=True)[0]
    elapsed_ms = (time.perf_counter() - started) * 1000
    with right:
        if reading.digits:
            st.markdown(
                f'<div class="digits-read" style="font-size: 5rem; font-weight: 700; letter-spacing: 0.3em">'
                f"{reading.digits}</div>",
                unsafe_allow_html=True,
            )
        else:
            st.warning("The model found no digits here.")
        verdict = (
            ""
            if truth is None
            else (" - right" if reading.digits == truth else f" - wrong, the truth is {truth or '(none)'}")
        )
        st.caption(f"Whole reading {reading.confidence:.1%} sure{verdict}. Read in {elapsed_ms:.0f} ms.")
    if reading.digits:
        st.markdown("**Where the model looked for each digit** (decoder cross-attention, red)")
        for column, digit, prob, attention in zip(
            st.columns(len(reading.digits)), reading.digits, reading.digit_probs, reading.attention
        ):
            column.image(attention_overlay(canvas, attention), caption=f"{digit}: {prob:.1%} sure")


def main() -> None:
    # One image is too little work to share between threads, and the browser needs a core:
    # with Chromium drawing on the same cores, one thread reads a pad faster than two
    # (docs/performance.md).
    torch.set_num_threads(1)
    st.set_page_config(page_title="Digit-sequence Transformer", layout="wide")
    st.title("Read handwritten digits")
    with st.sidebar:
        checkpoint = st.text_input("Checkpoint", str(DEFAULT_CHECKPOINT))
        pen_width = st.slider("Pen width", min_value=4, max_value=40, value=16)
    path = Path(checkpoint)
    try:
        model = cached_model(str(path), path.stat().st_mtime if path.is_file() else 0.0)
    except CheckpointError as error:
        st.error(str(error))
        return
    source = st.radio("Input", SOURCES, horizontal=True, label_visibility="collapsed")
    truth = None
    if source == "Draw":
        image = drawing_pad(pen_width)
    elif source == "Upload an image":
        image = uploaded_image()
    else:
        image, truth = random_example(model.config.image_size)
    if image is None:
        if source == "Draw":
            st.info(DRAW_HINT)
        return
    show_reading(model, image, truth)


if __name__ == "__main__":
    main()
