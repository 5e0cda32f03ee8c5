"""Encoder-decoder Transformer that reads the digit string in an image.

image (B, 1, H, W)
  -> patches -> linear projection + fixed 2D sin-cos position   (B, N, D)
  -> encoder: pre-norm blocks of self-attention + feed-forward  (B, N, D) "memory"
  -> decoder: pre-norm blocks of causal self-attention over the tokens read so far,
     cross-attention to the memory, feed-forward                (B, T, D)
  -> linear head over the vocabulary                            (B, T, VOCAB_SIZE)

With patch_head, a linear classifier also reads every memory vector: which digit (or none)
covers that patch. It only serves an auxiliary training loss (see patch_targets), which gives
the encoder a dense recognition signal; decoding never uses it.

The decoder is trained with teacher forcing (it sees the true previous tokens) and run
autoregressively at inference (greedy or beam search), one token per step: a DecoderCache
keeps the earlier tokens' keys and values and the memory's projections. Everything that reads
images reads them through DigitSequenceTransformer.read.

Also here: ModelConfig (whose defaults are the shipped model), the training loss, the optimiser
set-up, and the checkpoint format (save_checkpoint, load_checkpoint, load_model). This file
imports nothing from the rest of the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Vocabulary: digits are their own token ids 0-9, then four special tokens.
# Canvases are mostly black; standardising pixels with these statistics of the composites
# makes the patch content as loud as the position code from the first step.
PIXEL_MEAN, PIXEL_STD = 0.03, 0.14

SOS = 10  # start of sequence: the first decoder input
EOS = 11  # end of sequence: the model emits it after the last digit (or at once for a blank image)
PAD = 12  # fills sequences up to a fixed length; ignored by the loss
# Ends a sequence in EOS's place when the image holds more digits than max_digits: the model reads
# the first max_digits and then says there are more, rather than stopping as if that were all.
MANY = 13
VOCAB_SIZE = 14

# Classes of the optional per-patch head: the digit written over a patch, or none.
NO_DIGIT = 10
PATCH_CLASSES = 11
IGNORE = -100  # patch targets the loss skips (F.cross_entropy's default ignore_index)

STEMS = ("conv", "linear")
MAX_GRID = 64  # most patches per side of the image

DEFAULT_CHECKPOINT = Path("checkpoints/digit_transformer.pt")  # the shipped model (docs/results.md is its card)
# Version of the checkpoint layout that save_checkpoint writes (see its docstring); load_checkpoint
# refuses any other, so that a file is never half-understood.
CHECKPOINT_VERSION = 3


def uint8_to_input(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) uint8 canvases, white ink on black -> (B, 1, H, W) float model input in [0, 1]."""
    return images.unsqueeze(1).float().div_(255)


def encode_labels(labels: list[str], max_digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit strings -> (decoder inputs, targets), both (B, max_digits + 1) long tensors.

    "42" with max_digits=4 becomes
        inputs  [SOS, 4, 2, PAD, PAD]
        targets [4, 2, EOS, PAD, PAD]
    so position t of the output is trained to predict targets[t] having seen inputs[: t + 1].
    A label longer than max_digits ("123456") is read as its first max_digits digits, then MANY:
        inputs  [SOS, 1, 2, 3, 4]
        targets [1, 2, 3, 4, MANY]
    """
    length = max_digits + 1
    inputs, targets = [], []
    for label in labels:
        if not label.isascii() or not (label.isdigit() or label == ""):
            raise ValueError(f"label {label!r} is not a string of digits")
        digits = [int(c) for c in label[:max_digits]]
        padding = [PAD] * (length - len(digits) - 1)
        inputs.append([SOS, *digits, *padding])
        targets.append([*digits, MANY if len(label) > max_digits else EOS, *padding])
    # Made whole from lists rather than a tensor a row: on a GPU the host's time per step is the step's.
    return tuple(torch.tensor(rows, dtype=torch.long).view(len(labels), length) for rows in (inputs, targets))


def decoder_inputs(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) emitted tokens -> the decoder inputs that emitted them: SOS, then all but the last.
    Teacher forcing on these repeats exactly the steps of the decoding that chose the tokens."""
    return torch.cat([torch.full_like(tokens[:, :1], SOS), tokens[:, :-1]], dim=1)


def tokens_to_string(tokens: list[int] | torch.Tensor) -> str:
    """Digits up to the first EOS, MANY or PAD; a leading SOS is skipped."""
    out = []
    for token in tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens:
        if token in (EOS, MANY, PAD):
            break
        if token != SOS:
            out.append(str(token))
    return "".join(out)


def patch_targets(boxes: torch.Tensor, labels: list[str], *, image_size: int, patch_size: int) -> torch.Tensor:
    """Targets for the per-patch head: (B, K, 4) ink boxes (x0, y0, x1, y1 in label order, rows
    of -1 after the last digit) -> (B, N) patch classes, row-major like the encoder's patches.

    A patch is labelled with a digit when its centre lies in that digit's box (the patch holding
    the box centre always counts, so a thin "1" gets one too), NO_DIGIT when it touches no box,
    and IGNORE when it only grazes a box or its centre lies in two: half a digit is not a
    wrong answer, so it is not taught as one.

    Computed where boxes are: training gives it the loader's boxes on the CPU and moves the
    result, since boxes on a GPU would make every step wait for the device here (the check
    below reads them back)."""
    b, k, _ = boxes.shape
    grid = image_size // patch_size
    edges = torch.arange(grid, device=boxes.device) * patch_size
    py0, px0 = (z.flatten() for z in torch.meshgrid(edges, edges, indexing="ij"))  # (N,) top-left corners
    cy, cx = py0 + patch_size // 2, px0 + patch_size // 2
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))  # (B, K, 1) each
    real = x1 > 0
    overlaps = real & (px0 < x1) & (px0 + patch_size > x0) & (py0 < y1) & (py0 + patch_size > y0)  # (B, K, N)
    centre = ((y0 + y1) // 2).clamp(0, image_size - 1) // patch_size * grid + ((x0 + x1) // 2).clamp(
        0, image_size - 1
    ) // patch_size
    holds = real & (
        ((cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)) | (torch.arange(grid * grid, device=boxes.device) == centre)
    )
    for label, count in zip(labels, real.sum(dim=(1, 2)).tolist()):
        assert len(label) == count, f"label {label!r} has {len(label)} digits but {count} boxes"
    rows = [[int(ch) for ch in label] + [0] * (k - len(label)) for label in labels]
    digits = torch.tensor(rows, dtype=torch.long, device=boxes.device).view(b, k)  # made at once: one copy
    targets = torch.where(overlaps.any(dim=1), IGNORE, NO_DIGIT)
    single = holds.sum(dim=1) == 1
    owner = (holds.long() * digits[..., None]).sum(dim=1)  # the digit of the one box that holds it
    return torch.where(single, owner, targets)


def setting(
    default: object, help: str, low: float | None = None, high: float | None = None, choices: tuple = ()
) -> object:
    """A config field with its help text and its sane bounds (inclusive), checked by check_settings;
    the training script turns each field into a command-line flag."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


def check_settings(config: object) -> None:
    """Raise ValueError naming the first field of a config dataclass whose value has the wrong type
    or lies outside its bounds: a checkpoint or a config file can hold anything, and a size
    checked only after it was allocated may already have taken the machine's memory."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, kind, meta = getattr(config, f.name), hints[f.name], f.metadata
        numbers = list(value) if isinstance(value, (list, tuple)) else [value]
        if kind in (bool, str):
            right_type = isinstance(value, kind)
        elif kind in (int, float):
            right_type = not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
        else:  # a list of numbers, or None
            right_type = value is None or isinstance(value, (list, tuple))
            numbers = [] if value is None else numbers
        if not right_type:
            raise ValueError(f"{f.name} must be {getattr(kind, '__name__', kind)}, got {value!r}")
        for number in numbers if kind not in (bool, str) else []:
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise ValueError(f"{f.name} must hold finite numbers, got {value!r}")
            if not (meta.get("low") is None or number >= meta["low"]) or not (
                meta.get("high") is None or number <= meta["high"]
            ):
                raise ValueError(f"{f.name} must be between {meta['low']} and {meta['high']}, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")


@dataclass
class ModelConfig:
    """The model's shape. The defaults are the shipped model's (checkpoints/digit_transformer.pt),
    the shape both of the training script's recipes train."""

    image_size: int = setting(96, "side of the square canvas in pixels (the composites' canvas size)", 16, 1024)
    patch_size: int = setting(12, "side of the square patches the encoder reads", 2, 64)
    stem: str = setting(
        "conv", "how patches become vectors: a small CNN, or a linear projection of the pixels", choices=STEMS
    )
    stem_depth: int = setting(
        1, "conv stem: extra stride-1 3x3 convolutions at 1/4 resolution and on the patch grid", 0, 8
    )
    stem_width: int = setting(
        64, "conv stem: channels at 1/4 resolution (half that before, twice that on the patch grid)", 2, 512
    )
    stem_full_res: int = setting(
        8,
        "conv stem: channels of a stride-1 3x3 convolution at full resolution, before the first stride (0: none)",
        0,
        256,
    )
    stem_half_res: int = setting(
        0, "conv stem: stride-1 3x3 convolutions at half resolution, after the first stride (0: none)", 0, 8
    )
    d_model: int = setting(128, "width of every token vector", 8, 2048)
    n_heads: int = setting(4, "attention heads per layer", 1, 64)
    dim_k: int = setting(0, "query and key width of each attention head (0: d_model / n_heads)", 0, 1024)
    dim_v: int = setting(0, "value width of each attention head (0: d_model / n_heads)", 0, 1024)
    encoder_layers: int = setting(3, "encoder blocks", 1, 48)
    decoder_layers: int = setting(2, "decoder blocks", 1, 48)
    ff_mult: int = setting(4, "feed-forward hidden width, in multiples of d_model", 1, 16)
    dropout: float = setting(0.0, "dropout rate (fresh composites every epoch already prevent memorising)", 0.0, 0.99)
    max_digits: int = setting(4, "the most digits the model reads in one image", 1, 32)
    patch_head: bool = setting(
        True,
        "a linear classifier on the encoder output, which digit covers each patch (the "
        "auxiliary patch loss's; decoding never uses it)",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.d_model % 4:
            raise ValueError(f"d_model {self.d_model} must be a multiple of 4 for the 2D sin-cos encoding")
        if self.stem == "conv" and self.patch_size % 4:
            raise ValueError(f"the conv stem needs a patch_size that is a multiple of 4, got {self.patch_size}")
        if self.stem_width % 2:
            raise ValueError(f"stem_width must be an even number, got {self.stem_width}")
        if self.grid_size > MAX_GRID:  # attention costs grow with the square of the patch count
            raise ValueError(
                f"{self.image_size // self.patch_size}x{self.image_size // self.patch_size} patches: at most "
                f"{MAX_GRID}x{MAX_GRID}, raise patch_size or lower image_size"
            )

    @classmethod
    def from_dict(cls, settings: dict) -> ModelConfig:
        """A config from a checkpoint's or a file's dict, refusing names that are not fields."""
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"not model settings: {', '.join(map(str, unknown))}")
        return cls(**settings)

    @property
    def head_dim_k(self) -> int:
        return self.dim_k or self.d_model // self.n_heads

    @property
    def head_dim_v(self) -> int:
        return self.dim_v or self.d_model // self.n_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def max_tokens(self) -> int:
        return self.max_digits + 1  # SOS + digits as input, digits + EOS as output


def sincos_position_2d(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed (grid_size**2, dim) encoding: half the channels encode the row, half the column.

    Parameter-free, so a patch's position means the same thing wherever the digits fall."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(grid_size, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    y_angles = ys.flatten()[:, None] * freqs[None, :]
    x_angles = xs.flatten()[:, None] * freqs[None, :]
    return torch.cat([y_angles.sin(), y_angles.cos(), x_angles.sin(), x_angles.cos()], dim=1)


class PatchEmbedding(nn.Module):
    """Cut the image into non-overlapping patch_size**2 squares and project each to d_model."""

    def __init__(self, *, image_size: int, patch_size: int, d_model: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size * patch_size, d_model)
        self.register_buffer("position", sincos_position_2d(image_size // patch_size, d_model), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.patch_size
        assert c == 1 and h % p == 0 and w % p == 0, (
            f"expected (B, 1, H, W) with H, W multiples of {p}, got {tuple(images.shape)}"
        )
        patches = images.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        return self.proj(patches) + self.position


class ConvPatchEmbedding(nn.Module):
    """Patch embeddings made by a small CNN: 3x3 convolutions with strides 2, 2 and
    patch_size / 4, then a 1x1 projection to d_model, so each output vector still stands for
    one patch_size**2 square (same grid, same 2D position code as PatchEmbedding). With depth
    > 0, that many stride-1 3x3 convolutions follow the second stride (at 1/4 resolution) and
    the third (on the patch grid). With full_res > 0, a stride-1 3x3 convolution with that
    many channels reads the image before the first stride, so that the first features (thin
    strokes included) are computed at every pixel rather than at every other one; with
    half_res > 0, that many stride-1 convolutions work at half resolution, where a plain MNIST
    CNN spends most of its work on stroke shapes.

    A linear projection must learn strokes and their shifts inside a patch from scratch; the
    convolutions bring that locality with them, and the encoder learns much faster from far
    fewer images. The extra convolutions widen what one patch vector sees from 15 px (less
    than a digit) to 47 px (a whole digit and its neighbours) for about 5 % more compute;
    docs/design.md has the measured differences."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        d_model: int,
        width: int = 32,
        depth: int = 0,
        full_res: int = 0,
        half_res: int = 0,
    ):
        super().__init__()
        self.patch_size = patch_size

        def conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            kernel = max(3, stride)
            return [
                nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        layers = (conv(1, full_res, 1) + conv(full_res, width // 2, 2)) if full_res else conv(1, width // 2, 2)
        for _ in range(half_res):
            layers += conv(width // 2, width // 2, 1)
        layers += conv(width // 2, width, 2)
        for _ in range(depth):
            layers += conv(width, width, 1)
        layers += conv(width, 2 * width, patch_size // 4)
        for _ in range(depth):
            layers += conv(2 * width, 2 * width, 1)
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(2 * width, d_model, 1)
        self.register_buffer("position", sincos_position_2d(image_size // patch_size, d_model), persistent=False)
        # Channels-last (NHWC) is the layout oneDNN's CPU convolutions run natively (faster
        # training, docs/performance.md). It also makes the (B, D, h, w) output already laid out
        # as the (B, h * w, D) sequence the encoder wants.
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, c, h, w = images.shape
        p = self.patch_size
        assert c == 1 and h % p == 0 and w % p == 0, (
            f"expected (B, 1, H, W) with H, W multiples of {p}, got {tuple(images.shape)}"
        )
        features = self.proj(self.convs(images.contiguous(memory_format=torch.channels_last)))  # (B, D, H / p, W / p)
        assert features.shape[-2:] == (h // p, w // p), f"stem produced a {tuple(features.shape[-2:])} grid"
        return features.flatten(2).transpose(1, 2) + self.position


class KeyValueCache:
    """The keys and values one attention layer computed at earlier decoding steps, so that
    each step of autoregressive decoding feeds only the newest token through the decoder:
    cross-attention projects the memory once, self-attention appends one key and value per
    token. Keys are (B, heads, tokens, dim_k), values (B, heads, tokens, dim_v)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class DecoderCache:
    """A self- and a cross-attention KeyValueCache per decoder layer, and how many tokens
    they hold (the position of the next token)."""

    def __init__(self, layers: int):
        self.layers = [(KeyValueCache(), KeyValueCache()) for _ in range(layers)]
        self.length = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows (beam search: each surviving beam's parent). The cross-
        attention caches stay: a beam's parent reads the same image, so its memory rows match."""
        for self_cache, _ in self.layers:
            self_cache.keys, self_cache.values = self_cache.keys[rows], self_cache.values[rows]


class MultiHeadAttention(nn.Module):
    """Self-attention when context is None, cross-attention to `context` otherwise. With a
    cache, self-attention adds x's keys and values to the earlier tokens' and cross-attention
    reuses the context's once computed.

    Each head compares queries and keys of dim_k channels and mixes values of dim_v channels;
    the heads' values, side by side, are projected back to d_model. dim_k sets how finely a head
    can tell positions and contents apart (and the cost of the scores), dim_v how much each head
    carries; the usual choice, and the default, is d_model / n_heads for both."""

    def __init__(self, *, d_model: int, n_heads: int, dim_k: int, dim_v: int):
        super().__init__()
        self.n_heads, self.dim_k, self.dim_v = n_heads, dim_k, dim_v
        self.query = nn.Linear(d_model, n_heads * dim_k)
        self.key_value = nn.Linear(d_model, n_heads * (dim_k + dim_v))  # keys, then values
        self.out = nn.Linear(n_heads * dim_v, d_model)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        return_attention: bool = False,
        cache: KeyValueCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, _ = x.shape
        heads = lambda z: z.view(b, z.shape[1], self.n_heads, -1).transpose(1, 2)  # (B, heads, tokens, width)
        q = heads(self.query(x))
        if cache is not None and cache.keys is not None and context is not None:
            k, v = cache.keys, cache.values  # cross-attention: the memory was projected at the first step
        else:
            keys_values = self.key_value(x if context is None else context)
            k, v = (heads(z) for z in keys_values.split([self.n_heads * self.dim_k, self.n_heads * self.dim_v], dim=-1))
            if cache is not None:
                if cache.keys is not None:  # self-attention: the earlier tokens' keys and values, then x's
                    k, v = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)
                cache.keys, cache.values = k, v
        # The causal mask lines query i up with key i. With earlier tokens cached, the one new
        # token is the last and may see every key, so it needs no mask.
        assert not (causal and 1 < t < k.shape[2]), "with cached tokens, feed one new token at a time"
        causal = causal and t > 1
        if return_attention:
            # Same maths as the fused kernel, written out so the weights can be returned.
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if causal:
                future = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            attention = scores.softmax(dim=-1)
            y = attention @ v
        else:
            attention = None
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, t, self.n_heads * self.dim_v)), attention


class FeedForward(nn.Sequential):
    def __init__(self, *, d_model: int, ff_mult: int, dropout: float):
        super().__init__(
            nn.Linear(d_model, ff_mult * d_model),
            nn.GELU(),
            nn.Linear(ff_mult * d_model, d_model),
            nn.Dropout(dropout),
        )


class EncoderBlock(nn.Module):
    def __init__(self, *, d_model: int, n_heads: int, dim_k: int, dim_v: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model=d_model, n_heads=n_heads, dim_k=dim_k, dim_v=dim_v)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model=d_model, ff_mult=ff_mult, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attention = self.attn(self.norm_attn(x), return_attention=return_attention)
        x = x + self.drop(y)
        return x + self.ff(self.norm_ff(x)), attention


class DecoderBlock(nn.Module):
    def __init__(self, *, d_model: int, n_heads: int, dim_k: int, dim_v: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model=d_model, n_heads=n_heads, dim_k=dim_k, dim_v=dim_v)
        self.norm_cross = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model=d_model, n_heads=n_heads, dim_k=dim_k, dim_v=dim_v)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model=d_model, ff_mult=ff_mult, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        *,
        return_attention: bool = False,
        caches: tuple[KeyValueCache, KeyValueCache] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # Causal: token t attends to tokens <= t only, so training on a whole sequence at
        # once matches decoding one token at a time. PAD tokens come after EOS, so no real
        # token ever attends to one and no padding mask is needed.
        self_cache, cross_cache = caches if caches is not None else (None, None)
        y, self_attention = self.self_attn(
            self.norm_self(x), causal=True, return_attention=return_attention, cache=self_cache
        )
        x = x + self.drop(y)
        y, cross_attention = self.cross_attn(
            self.norm_cross(x), memory, return_attention=return_attention, cache=cross_cache
        )
        x = x + self.drop(y)
        return x + self.ff(self.norm_ff(x)), self_attention, cross_attention


@dataclass
class Decoded:
    """Result of greedy or beam decoding for a batch.

    tokens: (B, L) the emitted tokens after SOS (digits, then EOS or MANY, then PAD).
    token_probs: (B, L) the model's probability for each emitted token (1.0 on PAD).
    beams: with beam search, each image's finished beams, most probable first, as
        (digits, too_many, probability) tuples: the alternative readings.
    """

    tokens: torch.Tensor
    token_probs: torch.Tensor
    attention: torch.Tensor | None = None  # (B, L, grid, grid) with read(attention=True): see token_attention
    beams: list[list[tuple[str, bool, float]]] | None = None

    def strings(self) -> list[str]:
        return [tokens_to_string(row) for row in self.tokens]

    def too_many(self) -> list[bool]:
        """Whether each reading ended in MANY: the image holds more digits than the model reads."""
        return (self.tokens == MANY).any(dim=1).tolist()

    def digit_probs(self) -> list[list[float]]:
        return [probs[: len(s)].tolist() for s, probs in zip(self.strings(), self.token_probs)]

    def confidence(self) -> torch.Tensor:
        """Probability of the whole reading, its end (EOS or MANY) included: (B,). It is the product
        of the digits' probabilities and the probability that nothing else is written."""
        return self.token_probs.prod(dim=1)


@dataclass
class Calibration:
    """How a trained model's probabilities are read. temperature divides the logits (fitted on
    validation so that confidences match accuracy); a reading whose confidence is below
    min_confidence is reported as unsure (the threshold chosen on validation)."""

    temperature: float = 1.0
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        # Written so that NaN fails both comparisons.
        if not (0.05 <= self.temperature <= 20):
            raise ValueError(f"temperature must be 0.05 to 20, got {self.temperature!r}")
        if not (0.0 <= self.min_confidence <= 1.0):
            raise ValueError(f"min_confidence must be 0 to 1, got {self.min_confidence!r}")


class DigitSequenceTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.calibration = Calibration()  # load_model sets the checkpoint's
        self.reading = dict.fromkeys(("read_one", "read_batch"), FP32)  # load_model's choice (choose_precision)
        c = config
        block = dict(
            d_model=c.d_model,
            n_heads=c.n_heads,
            dim_k=c.head_dim_k,
            dim_v=c.head_dim_v,
            ff_mult=c.ff_mult,
            dropout=c.dropout,
        )
        patches = dict(image_size=c.image_size, patch_size=c.patch_size, d_model=c.d_model)
        if c.stem == "conv":
            self.patch_embed = ConvPatchEmbedding(
                **patches, width=c.stem_width, depth=c.stem_depth, full_res=c.stem_full_res, half_res=c.stem_half_res
            )
        else:
            self.patch_embed = PatchEmbedding(**patches)
        self.encoder = nn.ModuleList(EncoderBlock(**block) for _ in range(c.encoder_layers))
        self.encoder_norm = nn.LayerNorm(c.d_model)
        self.token_embed = nn.Embedding(VOCAB_SIZE, c.d_model)
        self.token_position = nn.Embedding(c.max_tokens, c.d_model)
        self.decoder = nn.ModuleList(DecoderBlock(**block) for _ in range(c.decoder_layers))
        self.decoder_norm = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, VOCAB_SIZE)
        self.patch_head = nn.Linear(c.d_model, PATCH_CLASSES) if c.patch_head else None
        self.drop = nn.Dropout(c.dropout)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Xavier keeps query-key products away from zero at this small width; with the tiny
        # N(0, 0.02) init of wide language models every attention map starts uniform and the
        # decoder sat for hundreds of steps predicting only how many digits there are.
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, images: torch.Tensor, *, attention: dict | None = None) -> torch.Tensor:
        """(B, 1, H, W) images in [0, 1], white ink on black -> (B, N, D) memory."""
        c = self.config
        assert images.shape[-2:] == (c.image_size, c.image_size), (
            f"expected {c.image_size}x{c.image_size} images, got {tuple(images.shape)}"
        )
        x = self.drop(self.patch_embed((images - PIXEL_MEAN) / PIXEL_STD))
        for i, block in enumerate(self.encoder):
            x, weights = block(x, return_attention=attention is not None)
            if attention is not None:
                attention[f"encoder.{i}.self"] = weights
        return self.encoder_norm(x)

    def decode(
        self,
        memory: torch.Tensor,
        tokens: torch.Tensor,
        *,
        attention: dict | None = None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """(B, N, D) memory and (B, T) input tokens -> (B, T, VOCAB_SIZE) next-token logits.
        With a cache, tokens are the ones after those the cache holds (at inference, one)."""
        start = cache.length if cache is not None else 0
        t = tokens.shape[1]
        assert start + t <= self.config.max_tokens, f"{start + t} tokens exceed max_tokens {self.config.max_tokens}"
        positions = torch.arange(start, start + t, device=tokens.device)
        x = self.drop(self.token_embed(tokens) + self.token_position(positions))
        for i, block in enumerate(self.decoder):
            caches = cache.layers[i] if cache is not None else None
            x, self_weights, cross_weights = block(x, memory, return_attention=attention is not None, caches=caches)
            if attention is not None:
                attention[f"decoder.{i}.self"] = self_weights
                attention[f"decoder.{i}.cross"] = cross_weights
        if cache is not None:
            cache.length += t
        return self.head(self.decoder_norm(x))

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher-forced logits (B, T, VOCAB_SIZE). With return_attention, also a dict of
        attention weights (B, heads, T_query, T_key) keyed like "encoder.0.self",
        "decoder.1.cross" (cross-attention keys are the image patches, row-major)."""
        attention: dict[str, torch.Tensor] | None = {} if return_attention else None
        logits = self.decode(self.encode(images, attention=attention), tokens, attention=attention)
        return (logits, attention) if return_attention else logits

    def token_log_probs(self, logits: torch.Tensor, first_step: int = 0) -> torch.Tensor:
        """(B, T, V) decoder logits for steps first_step, first_step + 1, ... -> the log-probabilities
        decoding chooses from: divided by the calibrated temperature, and only the tokens a reading
        may hold at each step. SOS and PAD are never predictions. MANY can only follow max_digits
        digits, where no further digit is allowed: the reading either ends there (EOS) or says
        there are more."""
        logits = logits.float() / self.calibration.temperature
        steps = torch.arange(first_step, first_step + logits.shape[1], device=logits.device)[None, :, None]
        tokens = torch.arange(VOCAB_SIZE, device=logits.device)
        allowed = (
            (tokens != SOS)
            & (tokens != PAD)
            & torch.where(steps < self.config.max_digits, tokens != MANY, tokens >= EOS)
        )
        return logits.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)

    # Decoding runs under inference_mode rather than no_grad: it also skips autograd's
    # bookkeeping of tensor versions and views, a large share of the time at one image per call.
    @torch.inference_mode()
    def read(self, images: torch.Tensor, *, beam_size: int = 1, attention: bool = False) -> Decoded:
        """The one way to read: (B, H, W) uint8 canvases, white ink on black -> the digits, with the
        probability of each token, by greedy decoding (beam_size 1) or beam search. With
        attention, also where the decoder looked for each token it emitted (Decoded.attention).
        Prediction, evaluation, validation, the benchmark and the front end all read through it."""
        device = next(self.parameters()).device
        with self.reading["read_one" if len(images) == 1 else "read_batch"].autocast(device):
            memory = self.encode(uint8_to_input(images.to(device)))
            decoded = self.greedy_decode(memory) if beam_size == 1 else self.beam_search(memory, beam_size)
        if attention:
            decoded.attention = self.token_attention(memory, decoded.tokens)
        return decoded

    @torch.inference_mode()
    def token_attention(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) memory and (B, L) emitted tokens -> (B, L, grid, grid): the cross-attention
        over the image patches of the step that emitted each token, averaged over heads and
        layers and scaled so that each map's most attended patch is 1. Teacher forcing on SOS +
        the emitted tokens repeats exactly the steps that emitted them."""
        inputs = decoder_inputs(tokens)
        weights: dict[str, torch.Tensor] = {}
        self.decode(memory, inputs, attention=weights)
        cross = torch.stack([weights[f"decoder.{i}.cross"] for i in range(self.config.decoder_layers)])
        maps = cross.float().mean(dim=(0, 2))  # (B, L, N)
        maps = maps / maps.amax(dim=-1, keepdim=True)
        grid = self.config.grid_size
        return maps.view(*maps.shape[:2], grid, grid)

    @torch.inference_mode()
    def greedy_decode(self, memory: torch.Tensor) -> Decoded:
        """Read (B, N, D) memory by taking the most probable token at every step; the batch
        stops early once every sequence has emitted EOS."""
        cache = DecoderCache(self.config.decoder_layers)  # each step feeds only the token chosen last
        return greedy_tokens(
            lambda last, step: self.token_log_probs(self.decode(memory, last, cache=cache), step)[:, -1],
            len(memory),
            self.config.max_digits,
            memory.device,
        )

    @torch.inference_mode()
    def beam_search(self, memory: torch.Tensor, beam_size: int = 4) -> Decoded:
        """Keep the beam_size most probable partial sequences per image of (B, N, D) memory;
        return the most probable complete one, and all the finished beams as alternatives
        (Decoded.beams). Sequences are compared by total log-probability."""
        if beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {beam_size}")
        max_digits = self.config.max_digits
        b, k = memory.shape[0], beam_size
        memory = memory.repeat_interleave(k, dim=0)
        device = memory.device
        tokens = torch.full((b * k, 1), SOS, dtype=torch.long, device=device)
        token_log_probs = torch.zeros(b * k, 0, device=device)
        scores = torch.full((b, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
        finished = torch.zeros(b * k, dtype=torch.bool, device=device)
        cache = DecoderCache(self.config.decoder_layers)
        for step in range(max_digits + 1):
            log_probs = self.token_log_probs(self.decode(memory, tokens[:, -1:], cache=cache), step)[:, -1]
            # A finished beam can only be extended by PAD, at no cost, so it keeps its score.
            log_probs[finished] = float("-inf")
            log_probs[finished, PAD] = 0.0
            candidates = (scores.view(b * k, 1) + log_probs).view(b, k * VOCAB_SIZE)
            scores, index = candidates.topk(k, dim=1)
            parent = (index // VOCAB_SIZE + torch.arange(b, device=device)[:, None] * k).flatten()
            next_token = (index % VOCAB_SIZE).flatten()
            tokens = torch.cat([tokens[parent], next_token[:, None]], dim=1)
            cache.reorder(parent)
            step_log_prob = log_probs[parent, next_token]
            token_log_probs = torch.cat([token_log_probs[parent], step_log_prob[:, None]], dim=1)
            finished = finished[parent] | (next_token == EOS) | (next_token == MANY)
            if finished.all():
                break
        # topk leaves each image's beams sorted, most probable first; -inf marks a slot no
        # sequence could fill (fewer possible readings than beams).
        beams = [
            [
                (tokens_to_string(tokens[i * k + j]), bool((tokens[i * k + j] == MANY).any()), math.exp(score))
                for j, score in enumerate(scores[i].tolist())
                if score > float("-inf")
            ]
            for i in range(b)
        ]
        best = torch.arange(b, device=device) * k
        return Decoded(tokens=tokens[best, 1:], token_probs=token_log_probs[best].exp(), beams=beams)


def greedy_tokens(
    next_log_probs: typing.Callable[[torch.Tensor, int], torch.Tensor],
    batch: int,
    max_digits: int,
    device: torch.device,
) -> Decoded:
    """Greedy decoding, given next_log_probs(last tokens (B, 1), step) -> (B, VOCAB_SIZE) log-probabilities
    of the next token: each step takes the most probable one, a finished sequence pads, and the batch
    stops once every sequence has emitted EOS or MANY."""
    tokens = torch.full((batch, 1), SOS, dtype=torch.long, device=device)
    probs = torch.ones(batch, 0, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_digits + 1):
        best_log_prob, next_token = next_log_probs(tokens[:, -1:], step).max(dim=-1)
        next_token = next_token.masked_fill(finished, PAD)
        best_prob = best_log_prob.exp().masked_fill(finished, 1.0)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        probs = torch.cat([probs, best_prob[:, None]], dim=1)
        finished |= (next_token == EOS) | (next_token == MANY)
        if finished.all():
            break
    return Decoded(tokens=tokens[:, 1:], token_probs=probs)


# Test-time augmentation: the image itself and four copies moved diagonally by a quarter patch of
# the shipped model, so that the digits fall differently on the patch grid.
TTA_SHIFTS = ((0, 0), (-3, -3), (3, 3), (-3, 3), (3, -3))


def shift_images(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """(B, H, W) canvases moved dx pixels right and dy down, black where nothing moves in."""
    h, w = images.shape[-2:]
    moved = torch.zeros_like(images)
    moved[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return moved


class Ensemble(nn.Module):
    """Several trained models, each reading the images as they are and, with shifts, moved copies
    of them, read as one model: at every decoding step the members' calibrated token probabilities
    are averaged and the most probable token is fed to all of them. It reads like the first model
    (its config, calibration and threshold); attention maps are the first model's, and beam search
    takes the first model's candidates and re-scores them (rescored)."""

    def __init__(self, models: list[DigitSequenceTransformer], shifts: tuple[tuple[int, int], ...] = ((0, 0),)):
        super().__init__()
        if len({(m.config.image_size, m.config.max_digits) for m in models}) > 1:
            raise ValueError("the models of an ensemble must read the same canvas size and number of digits")
        self.members, self.shifts = nn.ModuleList(models), shifts
        self.config, self.calibration = models[0].config, models[0].calibration
        self.reading = dict.fromkeys(models[0].reading, FP32)  # members read in fp32 here

    @property
    def decoding(self) -> str:
        """How it reads, in words (evaluate.py's reports say it)."""
        views = f", {len(self.shifts)} views each (test-time augmentation)" if len(self.shifts) > 1 else ""
        models = f"{len(self.members)} model{'s' * (len(self.members) > 1)}"
        return f"greedy, token probabilities averaged over {models}{views}"

    @torch.inference_mode()
    def read(self, images: torch.Tensor, *, beam_size: int = 1, attention: bool = False) -> Decoded:
        if beam_size > 1 or attention:  # candidates and attention maps from the first model
            decoded = self.members[0].read(images, beam_size=beam_size, attention=attention)
            if decoded.beams:
                decoded.beams = self.rescored(images, decoded.beams)
            return decoded
        readers = []  # (model, memory of one view, its decoder cache)
        for model in self.members:
            device = next(model.parameters()).device
            for dx, dy in self.shifts:
                memory = model.encode(uint8_to_input(shift_images(images, dx, dy).to(device)))
                readers.append((model, memory, DecoderCache(model.config.decoder_layers)))

        def averaged(last: torch.Tensor, step: int) -> torch.Tensor:
            probs = [m.token_log_probs(m.decode(mem, last, cache=c), step)[:, -1].exp() for m, mem, c in readers]
            return torch.stack(probs).mean(dim=0).log()

        return greedy_tokens(averaged, len(images), self.config.max_digits, readers[0][1].device)

    @torch.inference_mode()
    def rescored(
        self, images: torch.Tensor, beams: list[list[tuple[str, bool, float]]]
    ) -> list[list[tuple[str, bool, float]]]:
        """Each image's candidate readings (digits, too_many, _) with the probability the ensemble
        gives them, most probable first: every member and view scores each candidate teacher-forced
        and, token by token, the probabilities are averaged as read averages them, so a candidate
        that is also the greedy reading gets that reading's confidence."""
        rows = [i for i, options in enumerate(beams) for _ in options]
        targets = torch.tensor(
            [
                [*map(int, digits), MANY if too_many else EOS] + [PAD] * (self.config.max_digits - len(digits))
                for options in beams
                for digits, too_many, _ in options
            ]
        )
        probs = []
        for model in self.members:
            device = next(model.parameters()).device
            for dx, dy in self.shifts:
                memory = model.encode(uint8_to_input(shift_images(images[rows], dx, dy).to(device)))
                log_probs = model.token_log_probs(model.decode(memory, decoder_inputs(targets).to(device)))
                probs.append(log_probs.gather(-1, targets.to(device)[..., None])[..., 0].exp().cpu())
        confidence = torch.stack(probs).mean(dim=0).masked_fill(targets == PAD, 1.0).prod(dim=1).tolist()
        scored: list[list[tuple[str, bool, float]]] = [[] for _ in beams]
        for row, (digits, too_many), p in zip(rows, [(d, t) for o in beams for d, t, _ in o], confidence):
            scored[row].append((digits, too_many, p))
        return [sorted(options, key=lambda option: -option[2]) for options in scored]


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """(B, T, V) logits, (B, T) targets -> (B,) summed token cross-entropy per sequence (PAD ignored)."""
    losses = F.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=PAD, reduction="none", label_smoothing=label_smoothing
    )
    return losses.sum(dim=1)


def order_free_loss(
    model: DigitSequenceTransformer, memory: torch.Tensor, labels: list[str], *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Permutation-invariant training: each image is scored against every distinct ordering of
    its digits (at most 4! = 24) and only the cheapest ordering counts, so the decoder may read
    the digits in any order it finds easy. The encoder runs once; the decoder runs over all the
    orderings of the batch at once."""
    max_digits = model.config.max_digits
    orderings: list[str] = []
    owner: list[int] = []
    for i, label in enumerate(labels):
        # A label longer than the model reads is taught in its own order: which max_digits digits
        # come before MANY is then fixed.
        distinct = [label] if len(label) > max_digits else sorted({"".join(p) for p in itertools.permutations(label)})
        orderings += distinct
        owner += [i] * len(distinct)
    owner_index = torch.tensor(owner, device=memory.device)
    inputs, targets = (t.to(memory.device) for t in encode_labels(orderings, max_digits))
    losses = sequence_losses(model.decode(memory[owner_index], inputs), targets, label_smoothing=label_smoothing)
    best = torch.full((len(labels),), float("inf"), device=memory.device).scatter_reduce(0, owner_index, losses, "amin")
    num_tokens = sum(min(len(label), max_digits) + 1 for label in labels)  # digits + end, for every ordering
    return best.sum() / num_tokens


class TrainingLoss(nn.Module):
    """The training objective as one module: DistributedDataParallel synchronises gradients
    through its wrapped module's forward, and torch.compile compiles a forward, so both wrap
    this rather than the model (whose encode and decode are called separately)."""

    def __init__(
        self,
        model: DigitSequenceTransformer,
        *,
        label_smoothing: float,
        patch_loss_weight: float,
        order_free: bool,
        distill_weight: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.label_smoothing, self.patch_loss_weight, self.order_free = label_smoothing, patch_loss_weight, order_free
        self.distill_weight = distill_weight

    def forward(
        self,
        pixels: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        patch_classes: torch.Tensor | None,
        labels: list[str] | None = None,
        teacher_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of one batch; labels (the digit strings) only for the order-free loss;
        teacher_probs (B, T, vocabulary) only when distilling (teacher_probabilities)."""
        memory = self.model.encode(pixels)
        if self.order_free:
            loss = order_free_loss(self.model, memory, labels, label_smoothing=self.label_smoothing)
        else:
            logits = self.model.decode(memory, inputs).flatten(0, 1)
            loss = F.cross_entropy(logits, targets.flatten(), ignore_index=PAD, label_smoothing=self.label_smoothing)
            if teacher_probs is not None:
                # Distillation: the teachers' probabilities also say which wrong tokens were
                # nearly right, more to learn from than the one right token. Positions after
                # <eos> (PAD targets) are left out here too.
                taught = targets.flatten() != PAD
                soft = F.cross_entropy(logits[taught], teacher_probs.flatten(0, 1)[taught])
                loss = (1 - self.distill_weight) * loss + self.distill_weight * soft
        if self.patch_loss_weight > 0:
            # Every patch vector is told which digit it lies on: a dense recognition signal
            # beside the decoder's three or so tokens per image.
            loss = loss + self.patch_loss_weight * F.cross_entropy(
                self.model.patch_head(memory).flatten(0, 1), patch_classes.flatten()
            )
        return loss


@torch.no_grad()
def teacher_probabilities(
    teachers: list[DigitSequenceTransformer], pixels: torch.Tensor, inputs: torch.Tensor
) -> torch.Tensor:
    """The teachers' next-token probabilities (B, T, vocabulary), averaged, on the decoder inputs
    the student is taught on: what distilling an ensemble into one model learns from."""
    return torch.stack([t.decode(t.encode(pixels), inputs).float().softmax(-1) for t in teachers]).mean(0)


def configure_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98)
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only; biases and LayerNorm gains
    are left undecayed (decaying them only pulls them towards zero for no benefit)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ---- precision and threads: chosen by timing this model's own work on this machine

PRECISION_JOBS = ("train", "read_batch", "read_one")  # a training step, reading a batch, reading one image
PROBE_BATCH = 64  # images per probed training step or batch reading
PROBE_ROUNDS = 5  # fp32 and bf16 timed back to back this many times; the median of the rounds' ratios decides
# bf16 must save at least this share of the time: on shared machines one round's ratio strays by
# several per cent (docs/training.md), and bf16 rounds every product, so a near-tie goes to fp32.
BF16_MIN_SAVING = 0.1


@dataclass
class Precision:
    """How a job runs: matrix products in bf16 under autocast or in fp32, on how many CPU threads, and why."""

    bf16: bool
    threads: int
    why: str

    def autocast(self, device: torch.device) -> typing.ContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


FP32 = Precision(False, 0, "fp32")  # how a model reads until load_model chooses (threads: as they are)


def precision_cache_file() -> Path:
    """Where probe results are kept, per machine, model shape and job ($XDG_CACHE_HOME or ~/.cache)."""
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "digit-sequence-transformer"
        / "precision.json"
    )


def machine_name(device: torch.device) -> str:
    """What the probe's result depends on: the processor (or GPU) and the PyTorch build."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "cpu")
    return f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def probe_work(model: DigitSequenceTransformer, job: str) -> typing.Callable[[], None]:
    """One unit of the job on random canvases, on a copy of the model (a training pass would move
    BatchNorm's statistics): a whole training step (forward, backward, gradient clipping and the
    AdamW update, whose fp32 share of the step dilutes what bf16 saves), or greedy reading."""
    model = copy.deepcopy(model).train(job == "train")
    device, size = next(model.parameters()).device, model.config.image_size
    images = torch.randint(
        0, 256, (1 if job == "read_one" else PROBE_BATCH, size, size), dtype=torch.uint8, device=device
    )
    if job != "train":
        return lambda: model.read(images)
    tokens = torch.randint(0, 10, (len(images), model.config.max_tokens), device=device)
    optimizer = configure_optimizer(model, lr=1e-6, weight_decay=0.0)

    def step() -> None:
        model(uint8_to_input(images), tokens).float().logsumexp(-1).mean().backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(
    work: typing.Callable[[], object], precision: Precision, device: torch.device, runs: int
) -> tuple[float, float]:
    """(median seconds per run, CPU seconds per wall second) of work after a warm-up run."""
    torch.set_num_threads(precision.threads)
    times, busy = [], []
    with precision.autocast(device):
        for run in range(runs + 1):
            started, cpu = time.perf_counter(), time.process_time()
            work()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if run:  # the first run warms up: allocations, autocast's weight casts, kernels chosen
                times.append(time.perf_counter() - started)
                busy.append((time.process_time() - cpu) / times[-1])
    return sorted(times)[len(times) // 2], sum(busy) / len(busy)


def bf16_product_slowdown(device: torch.device) -> float:
    """How many times longer a bf16 matrix product, of the sizes this model multiplies, takes than
    fp32: tens of times on CPUs that emulate bf16, so the whole job need not be timed there."""
    a, b = torch.randn(512, 256, device=device), torch.randn(256, 512, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()
    as_is = Precision(False, torch.get_num_threads(), "")
    return timed(lambda: a16 @ b16, as_is, device, runs=5)[0] / timed(lambda: a @ b, as_is, device, runs=5)[0]


def choose_precision(
    requested: str, model: DigitSequenceTransformer, job: str, *, probe_threads: bool = True
) -> Precision:
    """The precision, and on a busy CPU the thread count, for a job of this model on this machine.
    "fp32" and "bf16" are taken as asked; "auto" times the job both ways, interleaved, and takes
    bf16 only where it saved at least BF16_MIN_SAVING of the time (where bf16 products alone are
    far slower, as on CPUs that emulate them, without timing the job). The choice is cached per
    machine, model shape and job (precision_cache_file). Threads are timed afresh, one count after
    another, whenever the job's threads find their cores taken (less CPU time than wall time),
    which changes from run to run."""
    device, threads = next(model.parameters()).device, torch.get_num_threads()
    # The probe's random canvases and dropout draw from torch's generators: put back as they were,
    # so that a run draws the same numbers whether or not its precision was timed or cached.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if requested != "auto":
            chosen = Precision(requested == "bf16", threads, f"{requested}, as asked")
        else:
            chosen = _measured_precision(model, job, device, threads)
        if device.type == "cpu" and threads > 1 and probe_threads:
            chosen = _fewer_threads_if_busy(probe_work(model, job), device, chosen)
    torch.set_num_threads(chosen.threads)
    return chosen


def _measured_precision(model: DigitSequenceTransformer, job: str, device: torch.device, threads: int) -> Precision:
    # The rule is part of the key: a choice made by another rule is timed again.
    rule = f"median of {PROBE_ROUNDS} rounds, bf16 if {BF16_MIN_SAVING:.0%} faster"
    shape = json.dumps(asdict(model.config), sort_keys=True)
    key = f"{job} | {rule} | {machine_name(device)} | {shape} | {threads} threads"
    cache = precision_cache_file()
    cached = _read_cache(cache).get(key)
    if isinstance(cached, dict) and isinstance(cached.get("bf16"), bool) and isinstance(cached.get("why"), str):
        return Precision(cached["bf16"], threads, cached["why"] + " (timed before, cached)")
    if device.type == "cpu" and (slowdown := bf16_product_slowdown(device)) > 2:
        chosen = Precision(False, threads, f"fp32: bf16 matrix products take {slowdown:.0f}x longer here")
    else:
        chosen = _time_both(probe_work(model, job), device, threads, job)
    _write_cache(cache, key, {"bf16": chosen.bf16, "why": chosen.why})
    return chosen


def _time_both(work: typing.Callable[[], object], device: torch.device, threads: int, job: str) -> Precision:
    ratios = []  # bf16's time over fp32's, per round: a pair timed back to back shares the machine's mood
    for round_ in range(PROBE_ROUNDS):
        seconds = {}
        for bf16 in (False, True) if round_ % 2 == 0 else (True, False):
            seconds[bf16] = timed(work, Precision(bf16, threads, ""), device, runs=2)[0]
        ratios.append(seconds[True] / seconds[False])
    ratio = sorted(ratios)[len(ratios) // 2]
    faster = ratio < 1 - BF16_MIN_SAVING
    return Precision(
        faster,
        threads,
        f"{'bf16' if faster else 'fp32'}: {job} timed {ratio:.2f}x fp32's time in bf16 "
        f"(median of {PROBE_ROUNDS} rounds, {min(ratios):.2f}-{max(ratios):.2f})",
    )


def _fewer_threads_if_busy(work: typing.Callable[[], object], device: torch.device, chosen: Precision) -> Precision:
    seconds, cpu_share = timed(work, chosen, device, runs=2)
    if cpu_share >= 0.75 * chosen.threads:
        return chosen
    tried = {chosen.threads: seconds}
    for threads in range(chosen.threads - 1, 0, -1):
        tried[threads] = timed(work, Precision(chosen.bf16, threads, ""), device, runs=2)[0]
    best = min(tried, key=tried.get)
    times = ", ".join(f"{n} thread{'s' * (n > 1)} {t * 1e3:.0f} ms" for n, t in sorted(tried.items()))
    return Precision(
        chosen.bf16, best, f"{chosen.why}; machine busy ({cpu_share:.1f} cores for {chosen.threads} threads): {times}"
    )


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: probe again
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(path: Path, key: str, value: dict) -> None:
    written = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = {**_read_cache(path), key: value}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            written = Path(f.name)
            json.dump(cache, f, indent=1)
        os.replace(written, path)
    except OSError:  # a read-only home or a full disk: the probe runs again next time
        if written is not None:
            written.unlink(missing_ok=True)  # no half-written file left beside the cache


def pick_device(requested: str = "auto") -> torch.device:
    """'auto': the first of cuda, mps and cpu that this machine has; anything else as given
    ("cuda:1"), if this machine has it (ValueError saying what it has otherwise)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ValueError(f"unknown device {requested!r}: expected auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {requested!r}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {requested!r}: MPS is not available here")
    return device


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable or not one this code can load."""


def save_checkpoint(path: str | Path, config: ModelConfig, weights: dict, **extra: object) -> None:
    """Write a checkpoint atomically: a uniquely named temporary file in the same folder, then a
    rename, so an interruption (or a second writer) never leaves half a file under `path`, and
    whatever was at `path` before stays whole until the new file replaces it.

    The layout (CHECKPOINT_VERSION 3), a dict of tensors and plain values only, so that
    torch.load(weights_only=True) reads it without running any pickled code:
        checkpoint_version  3
        model_config        asdict(ModelConfig): the model's shape
        model               state_dict of the weights to read with (the averaged ones, if any)
        calibration         asdict(Calibration), optional: the temperature and the unsure threshold
    and what the training script adds (see train_encoder_decoder.py): train_config, step,
    metrics and, in a run's last.pt / best.pt, training (the optimiser and the rest of the state
    that --resume needs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"checkpoint_version": CHECKPOINT_VERSION, "model_config": asdict(config), "model": weights, **extra}
    # A new name beside the target, made as open() makes any file (the umask applies, where mkstemp's
    # would be private), then renamed over the target: no reader ever sees half a checkpoint.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint at path, its model_config checked (types and bounds) before any model is
    built; CheckpointError, with a one-line reason, for a file that is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: train one with `uv run python train_encoder_decoder.py` "
            "(it writes runs/default/model.pt) or pass --checkpoint PATH"
        )
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # not a zip, a truncated file, a pickle needing code: all mean "not ours"
        # torch's first sentence says what failed; the rest (for a pickle that needs code to load,
        # the advice to load it unsafely) is not for our users.
        reason = str(error).strip().split("\n")[0].split(". ")[0][:160]
        raise CheckpointError(
            f"{path} is not a digit-sequence checkpoint ({type(error).__name__}: {reason})"
        ) from error
    version = checkpoint.get("checkpoint_version") if isinstance(checkpoint, dict) else None
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is not a digit-sequence checkpoint of version {CHECKPOINT_VERSION} (it has "
            f"{'no version' if version is None else f'version {version}'}): retrain it with this code"
        )
    try:
        checkpoint["model_config"] = ModelConfig.from_dict(checkpoint["model_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: unusable model_config ({error})") from error
    return checkpoint


def load_model(
    path: str | Path, device: str | torch.device = "auto", precision: str = "auto"
) -> DigitSequenceTransformer:
    """The model saved at path, in eval mode on device ("auto": a GPU when there is one), reading
    one image and batches each in the precision choose_precision picks for it."""
    device = pick_device(str(device))
    checkpoint = load_checkpoint(path, device)
    model = DigitSequenceTransformer(checkpoint["model_config"])
    try:
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:  # missing, extra or misshapen weights
        raise CheckpointError(
            f"{path}: the weights do not fit its model_config ({str(error).splitlines()[0]})"
        ) from error
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise CheckpointError(f"{path} holds weights that are NaN or infinite: the run that wrote it diverged")
    try:
        model.calibration = Calibration(**checkpoint.get("calibration", {}))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: unusable calibration ({error})") from error
    model = model.to(device).eval()
    for job in model.reading:
        model.reading[job] = choose_precision(precision, model, job, probe_threads=False)
    return model


def load_reader(
    path: str | Path,
    device: str | torch.device = "auto",
    precision: str = "auto",
    *,
    tta: bool = False,
    ensemble: typing.Sequence[str | Path] = (),
) -> DigitSequenceTransformer | Ensemble:
    """The model at path; with tta or more checkpoints, an Ensemble of them that reads like it."""
    model = load_model(path, device, precision)
    if not tta and not ensemble:
        return model
    members = [model] + [load_model(other, device, precision) for other in ensemble]
    for other, member in zip(ensemble, members[1:]):
        if (member.config.image_size, member.config.max_digits) != (model.config.image_size, model.config.max_digits):
            raise CheckpointError(
                f"{other} reads {member.config.image_size}x{member.config.image_size} canvases of up to "
                f"{member.config.max_digits} digits, {path} {model.config.image_size}x{model.config.image_size} "
                f"of up to {model.config.max_digits}: an ensemble's models must read alike"
            )
    return Ensemble(members, TTA_SHIFTS if tta else ((0, 0),))


def add_reader_options(parser: argparse.ArgumentParser) -> None:
    """The options with which predict.py and evaluate.py load what reads (load_reader's arguments)."""
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps ...")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 where timing this model's reading on this machine finds it faster, one image and "
        "batches each (model.choose_precision, cached per machine)",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: also read 4 copies of each image moved by 3 pixels and average the "
        "token probabilities (about 4 times the reading time; docs/results.md has what it buys)",
    )
    parser.add_argument(
        "--ensemble",
        action="append",
        default=[],
        metavar="CHECKPOINT",
        help="also read with this checkpoint (repeatable) and average the models' token probabilities; "
        "the confidence threshold stays --checkpoint's",
    )
