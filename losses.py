"""What the model is taught: the training objective.

- Token cross-entropy with teacher forcing: the decoder sees the true previous tokens and is
  scored on every next token, the end (EOS or TOO_MANY) included; PAD positions are skipped.
- The patch loss (with ModelConfig.patch_head): every encoder vector is also told which digit
  covers its patch, from the digits' ink boxes the composer knows (patch_targets): a dense
  recognition signal beside the decoder's few tokens per image.
- Optional: distillation from teacher models' next-token probabilities, and the order-free
  loss (any reading order of the digits counts), both compared in docs/training.md.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import NO_DIGIT, PAD, DigitSequenceTransformer, encode_labels

IGNORE = -100  # patch targets the loss skips (F.cross_entropy's default ignore_index)


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
    patch_of_centre = lambda a, b: ((a + b) // 2).clamp(0, image_size - 1) // patch_size  # row or column
    centre = patch_of_centre(y0, y1) * grid + patch_of_centre(x0, x1)  # (B, K, 1): the patch holding the box centre
    inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    holds = real & (inside | (torch.arange(grid * grid, device=boxes.device) == centre))
    for label, count in zip(labels, real.sum(dim=(1, 2)).tolist()):
        assert len(label) == count, f"label {label!r} has {len(label)} digits but {count} boxes"
    rows = [[int(ch) for ch in label] + [0] * (k - len(label)) for label in labels]
    digits = torch.tensor(rows, dtype=torch.long, device=boxes.device).view(b, k)  # made at once: one copy
    targets = torch.where(overlaps.any(dim=1), IGNORE, NO_DIGIT)
    single = holds.sum(dim=1) == 1
    owner = (holds.long() * digits[..., None]).sum(dim=1)  # the digit of the one box that holds it
    return torch.where(single, owner, targets)


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """(B, T, V) logits, (B, T) targets -> (B,) summed token cross-entropy per sequence (PAD ignored)."""
    losses = F.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=PAD, reduction="none", label_smoothing=label_smoothing
    )
    return losses.sum(dim=1)


def order_free_loss(
    model: DigitSequenceTransformer, memory: torch.Tensor, labels: list[str], *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Permutation-invariant training: each image is scored against every distinct ordering of its
    digits and only the cheapest counts, so the decoder may read the digits in any order it finds
    easy. The encoder runs once; the decoder runs over all the orderings of the batch at once."""
    max_digits = model.config.max_digits
    orderings: list[str] = []
    owner: list[int] = []
    for i, label in enumerate(labels):
        # A label longer than the model reads is taught in its own order: which max_digits digits
        # come before TOO_MANY is then fixed.
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
                # The teachers' probabilities also say which wrong tokens were nearly right, more to
                # learn from than the one right token. Positions after the end (PAD) are left out here too.
                taught = targets.flatten() != PAD
                soft = F.cross_entropy(logits[taught], teacher_probs.flatten(0, 1)[taught])
                loss = (1 - self.distill_weight) * loss + self.distill_weight * soft
        if self.patch_loss_weight > 0:
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
