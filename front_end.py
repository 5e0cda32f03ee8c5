"""Drawing pad: write a few digits with the mouse or a finger and watch the model read them.

    uv run streamlit run front_end.py

Three ways in: draw on the pad, upload an image, or press "New random example" for a composite
of MNIST test digits (its true digits are shown). The pad fits the page's column, a phone's too,
with the pen width and "Clear the pad" beside it; the drawing stays when you switch to another
source and back. Every image goes through predict.py's preprocessing (canvas.to_canvas), and the
page shows what the model sees and the digits read, with how sure the model is of the whole
reading and of each digit, and where it looked for each digit (decoder cross-attention). A reading
below the checkpoint's confidence threshold says "Not sure" and lists the most probable readings
instead; more digits than the model reads are flagged, with the first ones read. A blank pad, or
one with only a dot on it, is not read, and a file that is not an image gets one plain line.

Runs offline and sends nothing anywhere: the server listens on localhost only and uploads are
capped (.streamlit/config.toml); wandb is not involved.
"""

from __future__ import annotations

import copy
import io
import time
from pathlib import Path

import numpy as np
import streamlit as st
import torch
from PIL import Image

from canvas import BLANK_INK_LEVEL, to_canvas
from checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_model
from mnist import MnistUnavailableError, default_mnist_root, load_mnist
from model import DigitSequenceTransformer
from multidigit_generator import MultiDigitComposer
from predict import IMAGE_SUFFIXES, Reading, open_image, read_canvases
from split_multidigit_dataset import EVAL_COMPOSER

PAD_WIDTH, PAD_HEIGHT = 640, 320  # the widest drawing pad, in screen pixels; narrower columns get a narrower pad
MIN_PAD_WIDTH, MIN_PAD_HEIGHT = 240, 220  # a phone's pad stays tall enough for a finger to write in
VIEW_SIZE = 192  # screen pixels per side for the model's canvas and the attention maps
SOURCES = ("Draw", "Upload an image", "Random example")
DRAW_HINT = "Draw some digits: up to four, in a row or anywhere on the pad."
UPLOAD_HINT = "Upload a picture of up to four digits: PNG, JPEG, BMP, GIF, WebP or TIFF."
EXAMPLE_HINT = "Press *New random example* for a composite of MNIST test digits, with its true digits."
EMPTY_IMAGE = "There is no ink in this image (or only a dot): nothing to read."
EMPTY_EXAMPLE = "This example is a blank canvas: there is nothing to read, and the model reads nothing."
PROBABILITIES_NOTE = (
    "A digit's figure is how sure the model is of that digit alone. The whole reading's figure is lower: "
    "it needs every digit right and nothing else written."
)
ATTENTION_NOTE = (
    "Red shows the parts of the image the model looked at while it wrote each digit: the map should sit on that digit."
)

# Reports the width of the page's column (the host element stretches across it), so that the pad
# can be made to fit: the drawing component takes its size in pixels, and on a phone a pad wider
# than the column cannot be reached (a finger on the pad draws, it does not scroll).
COLUMN_WIDTH_JS = """
export default function ({ parentElement, setStateValue }) {
  const host = parentElement;
  host.widthObserver?.disconnect();
  const report = () => {
    const width = Math.floor(host.getBoundingClientRect().width);
    if (width > 0 && String(width) !== host.dataset.sentWidth) {
      host.dataset.sentWidth = String(width);
      setStateValue("width", width);
    }
  };
  host.widthObserver = new ResizeObserver(report);
  host.widthObserver.observe(host);
  report();
  return () => host.widthObserver?.disconnect();
}
"""


@st.cache_resource(show_spinner="Loading the model ...")
def cached_model(path: str, modified: float) -> DigitSequenceTransformer:
    """The model, loaded once per checkpoint file version (modified: its mtime, so that a
    retrained file is picked up)."""
    return load_model(path)


@st.cache_resource(show_spinner="Loading MNIST test digits ...")
def cached_composer(mnist_root: str, canvas_size: int) -> MultiDigitComposer:
    images, labels = load_mnist(mnist_root, train=False)
    return MultiDigitComposer(images, labels, canvas_size=canvas_size, **EVAL_COMPOSER)


@st.cache_resource
def column_width_component():  # registered once per server: a second registration under the name only warns
    return st.components.v2.component("digit_reader.column_width", js=COLUMN_WIDTH_JS, isolate_styles=False)


def column_width() -> int | None:
    """The main column's width in screen pixels, once the browser has reported it (None before,
    and in tests without a browser)."""
    result = column_width_component()(key="column-width", default={"width": None}, on_width_change=lambda: None)
    return result.get("width")


def pad_size(column: int | None) -> tuple[int, int]:
    """The pad as wide as the column (up to PAD_WIDTH), and half as high, but never lower than
    MIN_PAD_HEIGHT."""
    width = PAD_WIDTH if column is None else max(MIN_PAD_WIDTH, min(PAD_WIDTH, column - 2))  # 2: rounding slack
    return width, max(MIN_PAD_HEIGHT, min(PAD_HEIGHT, width // 2))


def scaled_drawing(drawing: dict | None, factor: float) -> dict | None:
    """A Fabric.js drawing made `factor` times larger, for a pad of another width (the component
    does not rescale it)."""
    if drawing is None or factor == 1:
        return drawing
    drawing = copy.deepcopy(drawing)
    for item in drawing.get("objects", []):
        for name in ("left", "top", "scaleX", "scaleY"):
            item[name] = item.get(name, 1 if name.startswith("scale") else 0) * factor
    return drawing


def clear_pad() -> None:
    st.session_state.pad_version = st.session_state.get("pad_version", 0) + 1
    for name in ("drawing", "drawing_width", "pad_image", "pad_mounted"):
        st.session_state.pop(name, None)


def drawing_pad(width: int, height: int, pen_width: int) -> Image.Image | None:
    """The pad and the picture on it. The last drawing is kept in session_state: a pad that comes
    back (after another source, or at another width) starts from it. While the pad stays on the
    page its start is not changed, which would redraw it under the pen and drop a stroke."""
    # Imported here: the component registers itself with the running app on import, which
    # fails anywhere else (a test, or `import front_end`).
    from streamlit_drawable_canvas import st_canvas

    state = st.session_state
    key = f"pad-{state.get('pad_version', 0)}-{width}"  # a new key is a new pad: cleared, or another width
    if state.get("pad_mounted") != key:
        state.pad_start = scaled_drawing(state.get("drawing"), width / state.get("drawing_width", width))
        state.pad_mounted = key
    result = st_canvas(
        stroke_width=pen_width,
        stroke_color="#000000",
        background_color="#ffffff",
        width=width,
        height=height,
        initial_drawing=state.pad_start,
        return_image_data=True,
        key=key,
    )
    data = result.image_data
    if data is not None:  # None until the browser sends the pad; a returning pad shows the kept picture meanwhile
        state.drawing, state.drawing_width, state.pad_image = result.json_data, width, Image.fromarray(data)
    return state.get("pad_image")


def draw_source(column: int | None) -> Image.Image | None:
    """Pen width and "Clear the pad" beside the pad, not in the sidebar: a phone hides the sidebar."""
    pen, clear = st.columns([3, 1], vertical_alignment="bottom")
    pen_width = pen.slider("Pen width", min_value=4, max_value=40, value=16)
    clear.button("Clear the pad", on_click=clear_pad)
    return drawing_pad(*pad_size(column), pen_width)


def upload_problem(name: str, error: ValueError) -> str:
    """predict.open_image's reason as one plain line. Its reasons for a file that cannot be read
    carry Pillow's exception ("cannot read image (UnidentifiedImageError: ...)"), which means
    nothing to someone who picked the wrong file; those about size ("image is ...") are kept."""
    reason = str(error)
    if not reason.startswith("image is"):
        return f"{name} is not an image that can be read (PNG, JPEG, BMP, GIF, WebP or TIFF), or it is damaged."
    return f"{name}: {reason.split(' (')[0]}."  # without Pillow's own wording in brackets


def uploaded_image() -> Image.Image | None:
    upload = st.file_uploader("An image of up to four digits", type=sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
    if upload is None:
        return None
    try:
        image = open_image(io.BytesIO(upload.getvalue()))
    except ValueError as error:
        st.error(upload_problem(upload.name, error))
        return None
    preview = image.convert("RGBA")  # any mode predict reads (16-bit, palette, ...) shows
    preview.thumbnail((2 * VIEW_SIZE, 2 * VIEW_SIZE))  # a photo's megapixels need not travel to the browser
    st.image(preview, caption=f"{upload.name} ({image.width}x{image.height})")
    return image


def random_example(canvas_size: int) -> tuple[Image.Image | None, str | None]:
    """A composite only when asked for, then kept (its seed) across reruns and source switches."""
    if st.button("New random example"):
        st.session_state.example_seed = int(np.random.default_rng().integers(2**31))
    if "example_seed" not in st.session_state:
        return None, None
    try:
        composer = cached_composer(default_mnist_root(), canvas_size)
    except MnistUnavailableError as error:
        st.error(str(error))
        st.stop()  # no hint to press the button again: it cannot help
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


def shown_probability(p: float) -> str:
    """A probability for people: never "100.0 %" for one that is not 1."""
    return ">99.9%" if 0.999 < p < 1 else f"{p:.1%}"


def big_text(text: str, css_class: str, size_rem: float, spacing_em: float = 0.0) -> None:
    st.markdown(
        f'<div class="{css_class}" style="font-size: {size_rem}rem; font-weight: 700; letter-spacing: {spacing_em}em">'
        f"{text}</div>",
        unsafe_allow_html=True,
    )


def alternative_line(digits: str, too_many: bool, probability: float, max_digits: int) -> str:
    shown = f"**{digits}**" if digits else "*nothing*"
    more = f" and more (more than {max_digits} digits)" if too_many else ""
    return f"- {shown}{more}: {shown_probability(probability)}"


def show_verdict(model: DigitSequenceTransformer, reading: Reading) -> None:
    """The digits in large type, or "Not sure" and the most probable readings; the overflow notice."""
    max_digits = model.config.max_digits
    if reading.unsure:
        big_text("Not sure", "not-sure", 3)
        options = reading.alternatives or [(reading.digits, reading.too_many, reading.confidence)]
        lines = [alternative_line(digits, more, p, max_digits) for digits, more, p in options[:3]]
        st.markdown("Most probable readings:\n" + "\n".join(lines))
    elif reading.digits:
        big_text(reading.digits, "digits-read", 5, spacing_em=0.3)  # spaced: each digit is read on its own
    else:
        st.warning("The model found no digits here.")
    if reading.too_many:
        st.warning(
            f"There are more than {max_digits} digits here: the model reads at most {max_digits}. "
            f"The first {max_digits} it read: {reading.digits}."
        )


def show_reading(model: DigitSequenceTransformer, image: Image.Image, truth: str | None, empty: str) -> None:
    """What the model sees and what it reads; `empty` is the line for an image with no ink."""
    started = time.perf_counter()
    canvas = to_canvas(image, model.config.image_size)
    left, right = st.columns([1, 2])
    left.image(upscale(canvas), caption=f"What the model sees ({canvas.shape[1]}x{canvas.shape[0]})")
    if canvas.max() < BLANK_INK_LEVEL:
        right.info(empty)
        return
    reading = read_canvases(model, [canvas], attention=True)[0]
    elapsed_ms = (time.perf_counter() - started) * 1000
    with right:
        show_verdict(model, reading)
        verdict = ""
        if truth is not None:
            verdict = " - right" if reading.digits == truth else f" - wrong, the truth is {truth or '(none)'}"
        st.caption(f"Whole reading {shown_probability(reading.confidence)} sure{verdict}. Read in {elapsed_ms:.0f} ms.")
        if reading.digits:
            st.caption(PROBABILITIES_NOTE)
    if reading.digits:
        st.markdown("**Where the model looked for each digit** (decoder cross-attention, red)")
        st.caption(ATTENTION_NOTE)
        for column, digit, prob, attention in zip(
            st.columns(len(reading.digits)), reading.digits, reading.digit_probs, reading.attention
        ):
            column.image(attention_overlay(canvas, attention), caption=f"{digit}: {shown_probability(prob)} sure")


def main() -> None:
    # One image is too little work to share between threads, and the browser needs a core:
    # with Chromium drawing on the same cores, one thread reads a pad faster than two
    # (docs/performance.md).
    torch.set_num_threads(1)
    st.set_page_config(page_title="Digit-sequence Transformer", layout="wide")
    st.title("Read handwritten digits")
    path = Path(st.sidebar.text_input("Checkpoint", str(DEFAULT_CHECKPOINT)))
    try:
        model = cached_model(str(path), path.stat().st_mtime if path.is_file() else 0.0)
    except CheckpointError as error:
        st.error(str(error))
        return
    column = column_width()  # on every run, so that the width is known when the pad comes back
    source = st.radio("Input", SOURCES, horizontal=True, label_visibility="collapsed")
    if source != "Draw":
        st.session_state.pop("pad_mounted", None)  # the pad leaves the page: when it is back, it starts anew
    truth = None
    if source == "Draw":
        image, hint, empty = draw_source(column), DRAW_HINT, DRAW_HINT
    elif source == "Upload an image":
        image, hint, empty = uploaded_image(), UPLOAD_HINT, EMPTY_IMAGE
    else:
        (image, truth), hint, empty = random_example(model.config.image_size), EXAMPLE_HINT, EMPTY_EXAMPLE
    if image is None:
        st.info(hint)
        return
    show_reading(model, image, truth, empty)


if __name__ == "__main__":
    main()
