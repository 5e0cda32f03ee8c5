"""The yardstick for digit reading: a plain CNN trained on single MNIST digits for a fixed time.

    uv run python cnn_reference.py                    # 13 minutes, then its error on the MNIST test digits
    uv run python cnn_reference.py --minutes 30 --out reports/cnn-30min.json

How well does the Transformer read one digit? Compare it with a small convolutional classifier
given the same CPU time on the same machine. The CNN is the textbook one: five 3x3
convolutions with BatchNorm (32, 32, max-pool, 64, 64, max-pool, 128 channels), global average
pooling and a linear layer, about 140,000 parameters; random affine augmentation; AdamW with a
one-cycle schedule over the time budget (the learning rate follows the clock, so any budget
gets a whole schedule); batches of 128 from the 60,000 MNIST training digits.

It is scored on the 10,000 MNIST test digits: the same pixels as the `mnist_digits` stress set
(split_multidigit_dataset.py --stress), where each digit sits alone at the centre of a canvas, so
`evaluate.py data/stress/mnist_digits` gives the Transformer's figure for the same digits
(docs/results.md compares them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from files import CommandLine, Staging, check_destination
from mnist import MnistUnavailableError, default_mnist_root, load_mnist


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def plain_cnn() -> nn.Sequential:
    """(B, 1, 28, 28) standardised digits -> (B, 10) logits."""
    return nn.Sequential(
        *conv_bn_relu(1, 32),
        *conv_bn_relu(32, 32),
        nn.MaxPool2d(2),
        *conv_bn_relu(32, 64),
        *conv_bn_relu(64, 64),
        nn.MaxPool2d(2),
        *conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def random_affine(digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each digit turned by up to 10 degrees, sheared by up to 0.15, scaled by 0.9-1.1 and moved by
    up to 2 pixels: the handwriting varies, the digit stays itself."""
    b = digits.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator)

    angle, shear, scale = uniform(-math.pi / 18, math.pi / 18), uniform(-0.15, 0.15), uniform(0.9, 1.1)
    shift = uniform(-2 / 14, 2 / 14), uniform(-2 / 14, 2 / 14)  # affine_grid's units: half the image is 1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear * cos, shift[0]], 1), torch.stack([sin, cos + shear * sin, shift[1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(digits.shape), align_corners=False)
    return F.grid_sample(digits, grid, align_corners=False, padding_mode="zeros")


def one_cycle(share: float, peak: float) -> float:
    """The learning rate when `share` of the budget is spent: a cosine rise over the first
    quarter, then a cosine fall to nearly nothing."""
    if share < 0.25:
        return peak * (0.04 + 0.96 * (1 - math.cos(math.pi * share / 0.25)) / 2)
    return peak * (1 + math.cos(math.pi * (share - 0.25) / 0.75)) / 2 + peak * 1e-3


def standardise(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(images)).float().div_(255).unsqueeze(1) - 0.13) / 0.31


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> dict:
    """Train for args.minutes, or args.steps steps when given; how long and how many digits that took."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    budget, steps, start = args.steps or args.minutes * 60, 0, time.perf_counter()

    def spent() -> float:
        return steps if args.steps else time.perf_counter() - start

    model.train()
    with tqdm(total=round(budget), unit="step" if args.steps else "s", desc="training the CNN") as progress:
        while (done := spent()) < budget:
            for group in optimizer.param_groups:
                group["lr"] = one_cycle(done / budget, args.lr)
            batch = torch.randint(len(images), (args.batch_size,), generator=generator)
            loss = F.cross_entropy(model(random_affine(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            progress.update(min(round(spent()), progress.total) - progress.n)
            if steps % 100 == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    return dict(train_seconds=round(seconds, 1), steps=steps, digits_seen=steps * args.batch_size)


@torch.inference_mode()
def misread_digits(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int, int]]:
    """(index, true digit, read digit) of every misread test digit."""
    model.eval()
    read = torch.cat([model(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    wrong = (read != labels).nonzero().flatten().tolist()
    return [(i, int(labels[i]), int(read[i])) for i in wrong]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CommandLine(__doc__)
    parser.add_argument("--minutes", type=float, default=13.0, help="training time (the schedule fits it)")
    parser.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes (0: minutes)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core)")
    parser.add_argument("--mnist-root", default=default_mnist_root())
    parser.add_argument("--out", help="also write the result as JSON to this file")
    parser.add_argument("--save", help="also save the trained CNN's weights (a state dict) to this file")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be above 0 and at most a day (1440)")
    if not 0 <= args.steps <= 10**7:
        parser.error("--steps must be 0 (train for --minutes) to 10,000,000")
    parser.check_range("--batch-size", args.batch_size, 1, 4096)
    if not 0 < args.lr <= 1:
        parser.error(f"--lr must be above 0 and at most 1, got {args.lr:g}")
    parser.check_range("--weight-decay", args.weight_decay, 0.0, 10.0)
    if not 0 <= args.threads <= 1024:
        parser.error("--threads must be 0 (every core) to 1024")
    parser.check_range("--seed", args.seed, 0, 2**31 - 1)
    if args.out and args.save and Path(args.out).resolve() == Path(args.save).resolve():
        parser.error("--out (the result, JSON) and --save (the weights) must be different files")
    for flag, path in (("--out", args.out), ("--save", args.save)):
        if path:
            parser.checked(flag, check_destination, path, None)  # before the training, not after it
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train_images, train_labels = load_mnist(args.mnist_root, train=True)
        test_images, test_labels = load_mnist(args.mnist_root, train=False)
    except MnistUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = plain_cnn()
    try:
        trained = train(model, standardise(train_images), torch.from_numpy(train_labels).long(), args)
    except KeyboardInterrupt:
        print("stopped by Ctrl-C: nothing written", file=sys.stderr)
        return 130
    errors = misread_digits(model, standardise(test_images), torch.from_numpy(test_labels).long())
    result = dict(
        model="plain CNN (cnn_reference.py)",
        parameters=sum(p.numel() for p in model.parameters()),
        minutes=None if args.steps else args.minutes,
        threads=torch.get_num_threads(),
        **trained,
        test_digits=len(test_labels),
        misread=len(errors),
        digit_error=len(errors) / len(test_labels),
        errors=errors,
    )
    print(
        f"plain CNN, {trained['train_seconds'] / 60:.1f} min on {result['threads']} threads: "
        f"{trained['steps']:,} steps, {trained['digits_seen']:,} digits seen "
        f"({trained['digits_seen'] / len(train_labels):.1f} epochs); MNIST test digits misread: {len(errors)} of "
        f"{len(test_labels)} ({100 * result['digit_error']:.2f} %)"
    )
    try:
        with Staging() as staging:
            if args.out:
                staging.file(args.out).write_text(json.dumps(result, indent=1) + "\n")
            if args.save:
                torch.save(model.state_dict(), staging.file(args.save))
    except OSError as error:  # a full disk, a read-only folder: neither file is left half-written
        print(f"error: writing {args.out or args.save} failed ({error}); nothing written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
