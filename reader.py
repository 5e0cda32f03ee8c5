"""What reads images for predict.py and evaluate.py: one trained model, or several and shifted
views of each averaged as one (Ensemble, test-time augmentation), and the options that choose it.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import torch
import torch.nn as nn

from checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_model
from files import CommandLine
from model import (
    EOS,
    PAD,
    TOO_MANY,
    Decoded,
    DecoderCache,
    DigitSequenceTransformer,
    decoder_inputs,
    greedy_tokens,
    uint8_to_input,
)
from precision import pick_device

# Beams kept per image at most: past a few, a wider search finds no other reading, and each beam
# costs a batch row at every step.
MAX_BEAM_SIZE = 32
MAX_BATCH_SIZE = 4096  # images read at once at most: a batch's canvases and activations are held together

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
    (its config, calibration and threshold); attention maps are the first model's, for the tokens
    the ensemble read, and beam search takes the first model's candidates and re-scores them (rescored)."""

    def __init__(self, models: list[DigitSequenceTransformer], shifts: tuple[tuple[int, int], ...] = ((0, 0),)):
        super().__init__()
        if len({(m.config.image_size, m.config.max_digits) for m in models}) > 1:
            raise ValueError("the models of an ensemble must read the same canvas size and number of digits")
        self.members, self.shifts = nn.ModuleList(models), shifts
        self.config, self.calibration = models[0].config, models[0].calibration
        self.read_bf16 = dict.fromkeys(models[0].read_bf16, False)  # members read in fp32 here

    @property
    def decoding(self) -> str:
        """How it reads, in words (evaluate.py's reports say it)."""
        views = f", {len(self.shifts)} views each (test-time augmentation)" if len(self.shifts) > 1 else ""
        models = f"{len(self.members)} model{'s' * (len(self.members) > 1)}"
        return f"greedy, token probabilities averaged over {models}{views}"

    @torch.inference_mode()
    def read(self, images: torch.Tensor, *, beam_size: int = 1, attention: bool = False) -> Decoded:
        if beam_size > 1:  # the first model's candidates, re-scored by all
            decoded = self.members[0].read(images, beam_size=beam_size, attention=attention)
            decoded.beams = self.rescored(images, decoded.beams)
            return decoded
        readers = [(model, memory, DecoderCache(model.config.decoder_layers)) for model, memory in self.views(images)]

        def averaged(last: torch.Tensor, step: int) -> torch.Tensor:
            probs = [m.token_log_probs(m.decode(mem, last, cache=c), step)[:, -1].exp() for m, mem, c in readers]
            return torch.stack(probs).mean(dim=0).log()

        decoded = greedy_tokens(averaged, len(images), self.config.max_digits, readers[0][1].device)
        if attention:  # where the first model, on the image as it is, looks for the tokens read together
            decoded.attention = self.members[0].token_attention(readers[0][1], decoded.tokens)
        return decoded

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
                [*map(int, digits), TOO_MANY if too_many else EOS] + [PAD] * (self.config.max_digits - len(digits))
                for options in beams
                for digits, too_many, _ in options
            ]
        )
        probs = []
        for model, memory in self.views(images[rows]):
            log_probs = model.token_log_probs(model.decode(memory, decoder_inputs(targets).to(memory.device)))
            probs.append(log_probs.gather(-1, targets.to(memory.device)[..., None])[..., 0].exp().cpu())
        confidence = iter(torch.stack(probs).mean(dim=0).masked_fill(targets == PAD, 1.0).prod(dim=1).tolist())
        scored = [[(digits, too_many, next(confidence)) for digits, too_many, _ in options] for options in beams]
        return [sorted(options, key=lambda option: -option[2]) for options in scored]

    def views(self, images: torch.Tensor) -> typing.Iterator[tuple[DigitSequenceTransformer, torch.Tensor]]:
        """(member, its memory of one view of the images) for every member and shift."""
        for model in self.members:
            device = next(model.parameters()).device
            for dx, dy in self.shifts:
                yield model, model.encode(uint8_to_input(shift_images(images, dx, dy).to(device)))


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
        "batches each (precision.choose_precision, cached per machine)",
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
    parser.add_argument(
        "--beam-size",
        type=int,
        default=1,
        help=f"1: greedy decoding; up to {MAX_BEAM_SIZE} (beam search is refused with --tta and --ensemble)",
    )


def check_reader_options(parser: CommandLine, args: argparse.Namespace) -> None:
    """Exit with a usage error for reader options no reading can take, before anything is loaded;
    args.device becomes the torch device."""
    parser.check_range("--beam-size", args.beam_size, 1, MAX_BEAM_SIZE)
    if args.beam_size > 1 and (args.tta or args.ensemble):
        parser.error("--beam-size searches with one model: drop it, or drop --tta and --ensemble")
    args.device = parser.checked("--device", pick_device, args.device)
