"""Encoder-decoder Transformer that reads the digit string in an image.

image (B, 1, H, W)
  -> patches: a small CNN stem (or a linear projection)
     + fixed 2D sin-cos position                                (B, N, D)
  -> encoder: pre-norm blocks of self-attention + feed-forward  (B, N, D) "memory"
  -> decoder: pre-norm blocks of causal self-attention over the tokens read so far,
     cross-attention to the memory, feed-forward                (B, T, D)
  -> linear head over the vocabulary                            (B, T, VOCAB_SIZE)

With patch_head, a linear classifier also reads every memory vector: which digit (or none)
covers that patch. It only serves an auxiliary training loss (losses.py), which gives the
encoder a dense recognition signal; decoding never uses it.

The decoder is trained with teacher forcing (it sees the true previous tokens) and run one token
per step at inference (greedy or beam search), a DecoderCache keeping the earlier tokens' keys and
values. Everything that reads images reads them through DigitSequenceTransformer.read.

Also here: ModelConfig (whose defaults are the shipped model) and the optimiser set-up. This file
imports nothing from the rest of the repository; losses.py holds what it is taught, checkpoint.py
saves and loads models, precision.py chooses how they run.
"""

from __future__ import annotations

import itertools
import math
import typing
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# Canvases are mostly black; standardising pixels with these statistics of the composites
# makes the patch content as loud as the position code from the first step.
PIXEL_MEAN, PIXEL_STD = 0.03, 0.14

# Vocabulary: digits are their own token ids 0-9, then four special tokens.
SOS = 10  # start of sequence: the first decoder input
EOS = 11  # end of sequence: the model emits it after the last digit (or at once for a blank image)
PAD = 12  # fills sequences up to a fixed length; ignored by the loss
TOO_MANY = 13  # ends a reading in EOS's place when more than max_digits digits are written: "and more"
VOCAB_SIZE = 14

# Classes of the optional per-patch head: the digit written over a patch, or none.
NO_DIGIT = 10
PATCH_CLASSES = 11

STEMS = ("conv", "linear")
MAX_GRID = 64  # most patches per side of the image


def uint8_to_input(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) uint8 canvases, white ink on black -> (B, 1, H, W) float model input in [0, 1]."""
    return images.unsqueeze(1).float().div_(255)


def encode_labels(labels: list[str], max_digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit strings -> (decoder inputs, targets), both (B, max_digits + 1) long tensors.

    "42" with max_digits=4 becomes
        inputs  [SOS, 4, 2, PAD, PAD]
        targets [4, 2, EOS, PAD, PAD]
    so position t of the output is trained to predict targets[t] having seen inputs[: t + 1].
    A label longer than max_digits ("123456") is read as its first max_digits digits, then TOO_MANY:
        inputs  [SOS, 1, 2, 3, 4]
        targets [1, 2, 3, 4, TOO_MANY]
    """
    inputs, targets = [], []
    for label in labels:
        if not label.isascii() or not (label.isdigit() or label == ""):
            raise ValueError(f"label {label!r} is not a string of digits")
        digits = [int(c) for c in label[:max_digits]]
        padding = [PAD] * (max_digits - len(digits))
        inputs.append([SOS, *digits, *padding])
        targets.append([*digits, TOO_MANY if len(label) > max_digits else EOS, *padding])
    # Made whole from lists rather than a tensor a row: on a GPU the host's time per step is the step's.
    return tuple(torch.tensor(rows, dtype=torch.long).view(len(labels), max_digits + 1) for rows in (inputs, targets))


def decoder_inputs(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) emitted tokens -> the decoder inputs that emitted them: SOS, then all but the last.
    Teacher forcing on these repeats exactly the steps of the decoding that chose the tokens."""
    return torch.cat([torch.full_like(tokens[:, :1], SOS), tokens[:, :-1]], dim=1)


def tokens_to_string(tokens: list[int] | torch.Tensor) -> str:
    """Digits up to the first EOS, TOO_MANY or PAD; a leading SOS is skipped."""
    tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
    read = itertools.takewhile(lambda token: token not in (EOS, TOO_MANY, PAD), tokens)
    return "".join(str(token) for token in read if token != SOS)


def setting(
    default: object, help: str, low: float | None = None, high: float | None = None, choices: tuple = ()
) -> object:
    """A config field with its help text and its sane bounds (inclusive), checked by check_settings;
    the training script turns each field into a command-line flag."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


def check_settings(config: object) -> None:
    """Raise ValueError naming the first field of a config dataclass of the wrong type or out of bounds:
    a checkpoint or config file can hold anything, and a size checked after allocating is too late."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, kind, meta = getattr(config, f.name), hints[f.name], f.metadata
        if kind in (bool, str):
            right_type, numbers = isinstance(value, kind), []
        elif kind in (int, float):
            right_type = not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
            numbers = [value]
        else:  # a list of numbers, or None
            right_type = value is None or isinstance(value, (list, tuple))
            numbers = value or []
        if not right_type:
            raise ValueError(f"{f.name} must be {getattr(kind, '__name__', kind)}, got {value!r}")
        for number in numbers:
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise ValueError(f"{f.name} must hold finite numbers, got {value!r}")
            low, high = meta.get("low"), meta.get("high")
            if (low is not None and number < low) or (high is not None and number > high):
                raise ValueError(f"{f.name} must be between {low} and {high}, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")


@dataclass
class ModelConfig:
    """The model's shape; the defaults are the shipped model's (checkpoints/digit_transformer.pt)."""

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
    stem_full_res: int = setting(16, "conv stem: channels of a 3x3 convolution at full resolution (0: none)", 0, 256)
    stem_half_res: int = setting(2, "conv stem: stride-1 3x3 convolutions at half resolution (0: none)", 0, 8)
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
                f"{self.grid_size}x{self.grid_size} patches: at most {MAX_GRID}x{MAX_GRID}, "
                "raise patch_size or lower image_size"
            )

    @classmethod
    def from_dict(cls, settings: dict) -> ModelConfig:
        """A config from a checkpoint's or a file's dict, refusing names that are not fields."""
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"not model settings: {', '.join(map(str, unknown))}")
        # Checkpoints written before the stem had half-resolution convolutions have none.
        return cls(**{"stem_half_res": 0, **settings})

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
    """Fixed (grid_size**2, dim) encoding, half the channels for the row and half for the column:
    parameter-free, so a patch's position means the same thing wherever the digits fall."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(grid_size, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    y_angles = ys.flatten()[:, None] * freqs[None, :]
    x_angles = xs.flatten()[:, None] * freqs[None, :]
    return torch.cat([y_angles.sin(), y_angles.cos(), x_angles.sin(), x_angles.cos()], dim=1)


class PatchEmbedding(nn.Module):
    """Cut the image into non-overlapping patch_size**2 squares and project each to d_model."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.patch_size = c.patch_size
        self.proj = nn.Linear(c.patch_size**2, c.d_model)
        self.register_buffer("position", sincos_position_2d(c.grid_size, c.d_model), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        p = self.patch_size
        patches = images.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        return self.proj(patches) + self.position


class ConvPatchEmbedding(nn.Module):
    """Patch embeddings made by a small CNN: 3x3 convolutions with strides 2, 2 and patch_size / 4,
    each followed by optional stride-1 ones, then a 1x1 projection to d_model: one vector per patch,
    on PatchEmbedding's grid and position code. Convolutions bring the locality a linear projection
    must learn, so the encoder learns from far fewer images (docs/design.md)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        width, depth, full_res, half_res = c.stem_width, c.stem_depth, c.stem_full_res, c.stem_half_res

        def conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            kernel = max(3, stride)
            return [
                nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        def same(channels: int, count: int) -> list[nn.Module]:
            return [layer for _ in range(count) for layer in conv(channels, channels, 1)]

        # Thin strokes seen at every pixel, stroke shapes at half resolution (as in an MNIST CNN), then 1/4 and grid.
        layers = conv(1, full_res, 1) if full_res else []
        layers += conv(full_res or 1, width // 2, 2) + same(width // 2, half_res)
        layers += conv(width // 2, width, 2) + same(width, depth)
        layers += conv(width, 2 * width, c.patch_size // 4) + same(2 * width, depth)
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(2 * width, c.d_model, 1)
        self.register_buffer("position", sincos_position_2d(c.grid_size, c.d_model), persistent=False)
        # Channels-last (NHWC): the layout oneDNN's CPU convolutions run natively, and the (B, D, h, w)
        # output is then already laid out as the (B, h * w, D) sequence the encoder wants.
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.proj(self.convs(images.contiguous(memory_format=torch.channels_last)))  # (B, D, H / p, W / p)
        return features.flatten(2).transpose(1, 2) + self.position


@dataclass
class KeyValueCache:
    """One attention layer's keys (B, heads, tokens, dim_k) and values (B, heads, tokens, dim_v)
    from earlier decoding steps, so each step feeds only the newest token: cross-attention
    projects the memory once, self-attention appends one key and value per token."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


class DecoderCache:
    """A self- and a cross-attention KeyValueCache per decoder layer; length: the tokens they hold."""

    def __init__(self, layers: int):
        self.layers = [(KeyValueCache(), KeyValueCache()) for _ in range(layers)]
        self.length = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows (beam search: each surviving beam's parent); the cross-attention
        caches stay, as a beam's parent reads the same image."""
        for self_cache, _ in self.layers:
            self_cache.keys, self_cache.values = self_cache.keys[rows], self_cache.values[rows]


class MultiHeadAttention(nn.Module):
    """Self-attention when context is None, cross-attention to `context` otherwise; with a cache,
    self-attention adds x's keys and values to the earlier tokens' and cross-attention reuses the
    context's. Each head compares queries and keys of dim_k channels (how finely it tells things
    apart) and mixes values of dim_v channels (how much it carries); usually both d_model / n_heads."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.dim_k, self.dim_v = c.n_heads, c.head_dim_k, c.head_dim_v
        self.query = nn.Linear(c.d_model, c.n_heads * self.dim_k)
        self.key_value = nn.Linear(c.d_model, c.n_heads * (self.dim_k + self.dim_v))  # keys, then values
        self.out = nn.Linear(c.n_heads * self.dim_v, c.d_model)

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
    def __init__(self, c: ModelConfig):
        width = c.ff_mult * c.d_model
        super().__init__(nn.Linear(c.d_model, width), nn.GELU(), nn.Linear(width, c.d_model), nn.Dropout(c.dropout))


class EncoderBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(c.d_model)
        self.attn = MultiHeadAttention(c)
        self.norm_ff = nn.LayerNorm(c.d_model)
        self.ff = FeedForward(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, *, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attention = self.attn(self.norm_attn(x), return_attention=return_attention)
        x = x + self.drop(y)
        return x + self.ff(self.norm_ff(x)), attention


class DecoderBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(c.d_model)
        self.self_attn = MultiHeadAttention(c)
        self.norm_cross = nn.LayerNorm(c.d_model)
        self.cross_attn = MultiHeadAttention(c)
        self.norm_ff = nn.LayerNorm(c.d_model)
        self.ff = FeedForward(c)
        self.drop = nn.Dropout(c.dropout)

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
    """Result of greedy or beam decoding for a batch."""

    tokens: torch.Tensor  # (B, L) emitted after SOS: digits, then EOS or TOO_MANY, then PAD
    token_probs: torch.Tensor  # (B, L) the model's probability of each emitted token (1.0 on PAD)
    attention: torch.Tensor | None = None  # (B, L, grid, grid) with read(attention=True): see token_attention
    # With beam search, each image's finished beams, most probable first: (digits, too_many, probability).
    beams: list[list[tuple[str, bool, float]]] | None = None

    def strings(self) -> list[str]:
        return [tokens_to_string(row) for row in self.tokens]

    def too_many(self) -> list[bool]:
        """Whether each reading ended in TOO_MANY: the image holds more digits than the model reads."""
        return (self.tokens == TOO_MANY).any(dim=1).tolist()

    def digit_probs(self) -> list[list[float]]:
        return [probs[: len(s)].tolist() for s, probs in zip(self.strings(), self.token_probs)]

    def confidence(self) -> torch.Tensor:
        """Probability of the whole reading, its end (EOS or TOO_MANY) included: (B,). It is the product
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
        # Whether read() multiplies in bf16, reading one image and reading batches: load_model sets
        # what precision.choose_precision finds faster on this machine.
        self.read_bf16 = {"read_one": False, "read_batch": False}
        c = config
        self.patch_embed = ConvPatchEmbedding(c) if c.stem == "conv" else PatchEmbedding(c)
        self.encoder = nn.ModuleList(EncoderBlock(c) for _ in range(c.encoder_layers))
        self.encoder_norm = nn.LayerNorm(c.d_model)
        self.token_embed = nn.Embedding(VOCAB_SIZE, c.d_model)
        self.token_position = nn.Embedding(c.max_tokens, c.d_model)
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.decoder_layers))
        self.decoder_norm = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, VOCAB_SIZE)
        self.patch_head = nn.Linear(c.d_model, PATCH_CLASSES) if c.patch_head else None
        self.drop = nn.Dropout(c.dropout)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Xavier keeps query-key products away from zero at this small width; with the N(0, 0.02)
        # of wide language models every attention map starts uniform, and learning stalls.
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
        assert images.shape[1:] == (1, c.image_size, c.image_size), (
            f"expected {c.image_size}x{c.image_size} images of one channel, got {tuple(images.shape)}"
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
        """(B, T, V) decoder logits for steps first_step, ... -> the log-probabilities decoding chooses
        from: divided by the calibrated temperature, and only tokens a reading may hold at each step
        (a digit or EOS; after max_digits digits only EOS, or TOO_MANY to say there are more)."""
        logits = logits.float() / self.calibration.temperature
        steps = torch.arange(first_step, first_step + logits.shape[1], device=logits.device)[None, :, None]
        tokens = torch.arange(VOCAB_SIZE, device=logits.device)
        digit_or_eos = (tokens < SOS) | (tokens == EOS)  # the digits are tokens 0-9
        allowed = torch.where(steps < self.config.max_digits, digit_or_eos, (tokens == EOS) | (tokens == TOO_MANY))
        return logits.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)

    # Decoding runs under inference_mode rather than no_grad: it also skips autograd's
    # bookkeeping of tensor versions and views, a large share of the time at one image per call.
    @torch.inference_mode()
    def read(self, images: torch.Tensor, *, beam_size: int = 1, attention: bool = False) -> Decoded:
        """The one way to read, for every script: (B, H, W) uint8 canvases, white ink on black -> the
        digits and each token's probability, by greedy decoding (beam_size 1) or beam search; with
        attention, also where the decoder looked for each token it emitted (Decoded.attention)."""
        device = next(self.parameters()).device
        bf16 = self.read_bf16["read_one" if len(images) == 1 else "read_batch"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            memory = self.encode(uint8_to_input(images.to(device)))
            decoded = self.greedy_decode(memory) if beam_size == 1 else self.beam_search(memory, beam_size)
        if attention:
            decoded.attention = self.token_attention(memory, decoded.tokens)
        return decoded

    @torch.inference_mode()
    def token_attention(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) memory and (B, L) emitted tokens -> (B, L, grid, grid): the cross-attention over
        the patches at the step that emitted each token (teacher forcing on SOS + the emitted tokens
        repeats those steps), averaged over heads and layers, each map's largest weight scaled to 1."""
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
        """Read (B, N, D) memory taking the most probable token at every step (see greedy_tokens)."""
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
        b, k = memory.shape[0], beam_size
        memory = memory.repeat_interleave(k, dim=0)
        device = memory.device
        tokens = torch.full((b * k, 1), SOS, dtype=torch.long, device=device)
        token_log_probs = torch.zeros(b * k, 0, device=device)
        scores = torch.full((b, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
        finished = torch.zeros(b * k, dtype=torch.bool, device=device)
        cache = DecoderCache(self.config.decoder_layers)
        for step in range(self.config.max_tokens):
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
            finished = finished[parent] | (next_token == EOS) | (next_token == TOO_MANY)
            if finished.all():
                break
        # topk leaves each image's beams sorted, most probable first; -inf marks a slot no
        # sequence could fill (fewer possible readings than beams).
        beams = [
            [
                (tokens_to_string(tokens[i * k + j]), bool((tokens[i * k + j] == TOO_MANY).any()), math.exp(score))
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
    stops once every sequence has emitted EOS or TOO_MANY."""
    tokens = torch.full((batch, 1), SOS, dtype=torch.long, device=device)
    probs = torch.ones(batch, 0, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_digits + 1):
        best_log_prob, next_token = next_log_probs(tokens[:, -1:], step).max(dim=-1)
        next_token = next_token.masked_fill(finished, PAD)
        best_prob = best_log_prob.exp().masked_fill(finished, 1.0)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        probs = torch.cat([probs, best_prob[:, None]], dim=1)
        finished |= (next_token == EOS) | (next_token == TOO_MANY)
        if finished.all():
            break
    return Decoded(tokens=tokens[:, 1:], token_probs=probs)


def configure_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98)
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only; biases and LayerNorm gains
    are left undecayed (decaying them only pulls them towards zero for no benefit)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
