"""Train the digit-sequence Transformer on fresh MNIST composites.

    uv run python train_encoder_decoder.py                             # the quick recipe
    uv run python train_encoder_decoder.py --recipe full --out-dir runs/full   # the shipped model's recipe
    uv run python train_encoder_decoder.py --resume runs/default/last.pt
    uv run python train_encoder_decoder.py --d-model 96 --epochs 4     # any setting of ModelConfig or TrainConfig
    uv run python train_encoder_decoder.py --config best_config.json   # settings from a JSON file
    uv run python train_encoder_decoder.py --run-type sweep --count 8  # trials of sweep_config.py
    uv run torchrun --standalone --nproc_per_node=4 train_encoder_decoder.py   # data-parallel, 4 processes

Settings: every field of model.ModelConfig (the model's shape) and of TrainConfig below (data,
optimisation, schedule) is a flag, `d_model` as `--d-model`; their defaults are the quick
recipe, and `--recipe full` (RECIPES) the longer one meant for the shipped model. `--config FILE` reads a flat JSON
object of such fields; flags on the command line win over it, and it over the recipe. Each run
writes all of them to OUT_DIR/config.json, which `--config` reads back. The other flags are run
options (where, on what, how to log) and change no result beyond rounding (`--precision`,
`--threads`), but for `--init-from`, which starts from a trained model's weights.

Reads top to bottom: the settings (TrainConfig), the data, the model and optimiser, the training
step, an epoch, validation, the whole run (every epoch on fresh composites, saving last.pt and
best.pt; export tests the final averaged weights and writes test_metrics.json and model.pt), then
the command line. Ctrl-C (or SIGTERM) stops after the current step and saves last.pt; --resume
continues exactly. The machinery around a run is in runs.py, the flags in train_options.py, sweeps
in sweeps.py.

Under torchrun the same script trains data-parallel (DistributedDataParallel: gloo on CPUs, nccl
on GPUs): --batch-size stays the global batch, split over the processes, so a run takes the same
steps whatever their number; rank 0 alone prints, logs to wandb and writes files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import runs
from checkpoint import CheckpointError, save_checkpoint
from datasets import CachedComposites, EpochInMemory, FreshComposites, MultiDigitFolder
from evaluate import SequenceAccuracy, as_expected, as_read, expected_calibration_error, fit_calibration
from files import CommandLine, Staging, file_digest
from losses import TrainingLoss, patch_targets, teacher_probabilities
from mnist import MnistUnavailableError, load_mnist
from model import (
    PAD,
    Calibration,
    DigitSequenceTransformer,
    ModelConfig,
    check_settings,
    configure_optimizer,
    encode_labels,
    setting,
    uint8_to_input,
)
from multidigit_generator import ComposerSettings, MultiDigitComposer, check_composer_settings, generate
from precision import Precision, choose_precision
from runs import Processes, RunContext, StopSignal
from split_multidigit_dataset import SPLITS_FILE, check_split_folders, load_splits, prepare_splits
from sweep_config import TRIAL_BUDGET
from sweeps import sweep
from train_options import add_run_options, add_settings_flags, check_run_options, flag_names, read_config_file

COMPOSER_OPTIONS = {f.name: f for f in fields(ComposerSettings)}


def world(name: str, default: float, low: float, high: float) -> object:
    """The training setting of the composer's option of that name, its help said once in ComposerSettings."""
    return setting(default, COMPOSER_OPTIONS[name].metadata["help"], low, high)


@dataclass
class TrainConfig:
    """How the model is trained. The defaults are the quick recipe; RECIPES["full"] changes a few."""

    train_images: int = setting(20000, "fresh composites per epoch", 1, 10**8)
    length_weights: list[float] | None = setting(
        None,
        "relative frequencies of 0, 1, ..., max-digits digits in training composites (None: 1,3,5,...: mostly "
        "full canvases, so compute goes to digits rather than to blank paper)",
        0,
        1e6,
    )
    augment_strength: float = setting(1.0, "per-digit rotation, shear, scale and stroke changes (0: none)", 0.0, 5.0)
    # The wider world training composes (multidigit_generator.MultiDigitComposer; the
    # evaluation sets keep digits as written, and stress sets measure each of these).
    min_digit_height: int = setting(14, "smallest ink height of a training digit, in pixels", 6, 1024)
    max_digit_height: int = setting(
        34, "largest ink height of a training digit (fewer digits per canvas can be this tall)", 6, 1024
    )
    thickest_stroke: int = world("thickest_stroke", 2, 1, 3)
    row_tilt: float = world("row_tilt", 8.0, 0.0, 20.0)
    pen_share: float = world("pen_share", 0.25, 0.0, 1.0)
    paper_noise: float = world("paper_noise", 0.2, 0.0, 1.0)
    touching_share: float = world("touching_share", 0.2, 0.0, 1.0)
    nondigit_share: float = world("nondigit_share", 0.06, 0.0, 1.0)
    overflow_share: float = world("overflow_share", 0.04, 0.0, 1.0)
    elastic_share: float = world("elastic_share", 0.0, 0.0, 1.0)
    epochs: int = setting(11, "passes over --train-images fresh composites", 1, 100_000)
    batch_size: int = setting(64, "images per optimiser step, over all processes together", 1, 65536)
    lr: float = setting(1e-3, "peak learning rate", 1e-8, 1.0)
    min_lr_ratio: float = setting(0.05, "the cosine schedule decays to lr x this", 0.0, 1.0)
    warmup_steps: int = setting(100, "steps of linear warm-up", 0, 10**7)
    weight_decay: float = setting(0.05, "AdamW weight decay of matrices and embeddings", 0.0, 10.0)
    label_smoothing: float = setting(0.0, "label smoothing of the token loss", 0.0, 0.99)
    order_free: bool = setting(
        False,
        "score each image against its best ordering of the digits (the loss minimised "
        "over the label's permutations); the best checkpoint is then picked by order-free accuracy",
    )
    distill_weight: float = setting(
        0.5,
        "with --distill-from: the share of the token loss that matches the teachers' probabilities "
        "rather than the label",
        0.0,
        1.0,
    )
    patch_loss_weight: float = setting(
        10.0,
        "weight of an auxiliary loss that classifies every encoder patch vector as "
        "the digit it lies on, or none (0: off, and the model has no patch head)",
        0.0,
        1e4,
    )
    ema_decay: float = setting(
        0.999,
        "validate, test and ship an exponential moving average of the weights with this decay (0: the raw weights)",
        0.0,
        0.999999,
    )
    grad_clip: float = setting(1.0, "largest gradient norm (0: no clipping)", 0.0, 1e6)
    seed: int = setting(0, "seed of the model's initial weights and of every training composite", 0, 2**31 - 1)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.min_digit_height > self.max_digit_height:
            raise ValueError(
                f"min_digit_height {self.min_digit_height} is above max_digit_height {self.max_digit_height}"
            )


# The two named recipes, as settings over TrainConfig's defaults: quick is the default command, full trains
# the shipped model (docs/training.md has both recipes' figures).
RECIPES = {"quick": {}, "full": {"epochs": 50}}

# The settings a run is made of: every field of both configs except patch_head, which follows
# from patch_loss_weight (a head no loss trains would be dead weight).
MODEL_SETTINGS = [f.name for f in fields(ModelConfig) if f.name != "patch_head"]
TRAIN_SETTINGS = [f.name for f in fields(TrainConfig)]
SETTINGS = MODEL_SETTINGS + TRAIN_SETTINGS


def make_configs(settings: dict) -> tuple[ModelConfig, TrainConfig]:
    """The two configs from a flat dict of settings (missing ones take their defaults); ValueError
    naming the setting for an unknown name or an impossible value or combination."""
    if unknown := sorted(set(settings) - set(SETTINGS)):
        raise ValueError(f"not settings of ModelConfig or TrainConfig: {', '.join(map(str, unknown))}")
    train_config = TrainConfig(**{k: v for k, v in settings.items() if k in TRAIN_SETTINGS})
    model_config = ModelConfig(
        **{k: v for k, v in settings.items() if k in MODEL_SETTINGS}, patch_head=train_config.patch_loss_weight > 0
    )
    try:
        check_composer_settings(**training_composer(model_config, train_config))
    except ValueError as error:  # said in the composer's words: its canvas is the model's image
        words = {
            "canvas_size": "image_size",
            "--canvas-size": "--image-size",
            "--digit-height": "--min-digit-height",
            "digit_height": "--min-digit-height/--max-digit-height",
        }
        raise ValueError(re.sub("|".join(words), lambda m: words[m[0]], str(error))) from None
    return model_config, train_config


def all_settings(model_config: ModelConfig, train_config: TrainConfig) -> dict:
    """The flat dict make_configs takes, and config.json and --config hold."""
    return {**{k: getattr(model_config, k) for k in MODEL_SETTINGS}, **asdict(train_config)}


def training_composer(model_config: ModelConfig, train_config: TrainConfig) -> dict:
    """How training composes its images (the evaluation sets' own settings are in splits.json)."""
    c = train_config
    shared = {name: getattr(c, name) for name in TRAIN_SETTINGS if name in COMPOSER_OPTIONS}  # pen_share, ...
    return dict(
        shared,
        canvas_size=model_config.image_size,
        max_digits=model_config.max_digits,
        length_weights=c.length_weights or [2.0 * n + 1 for n in range(model_config.max_digits + 1)],
        digit_height=(c.min_digit_height, c.max_digit_height),
    )


# ---- data: disjoint digit pools; val/test are fixed folders, train is composed fresh each epoch


@dataclass
class RunData:
    """What a run trains, validates and tests on, and how many steps it takes."""

    train_set: FreshComposites | EpochInMemory | CachedComposites
    val_set: MultiDigitFolder
    test_set: MultiDigitFolder
    steps_per_epoch: int
    total_steps: int
    val_composer: MultiDigitComposer  # validation digits composed as training composes: calibration's harder half


def build_data(job: RunContext) -> RunData:
    options, model_config, train_config, procs = job.options, job.model_config, job.train_config, job.procs
    data_dir = Path(options.data_dir)
    splits_file = data_dir / SPLITS_FILE
    trained_on = options.splits_digest  # a resumed run's split, which it must go on with
    if trained_on and not splits_file.is_file():
        raise ValueError(
            f"{splits_file} is gone, and the run being resumed trained on the split it held: put "
            "that data folder back, or pass its --data-dir (a new split would give the run other digits)"
        )
    if procs.is_main and not splits_file.is_file():
        print(f"{splits_file} not found: splitting MNIST and composing val/test sets")
        prepare_splits(
            data_dir,
            mnist_root=options.mnist_root,
            composer=dict(max_digits=model_config.max_digits, canvas_size=model_config.image_size),
        )
    if procs.world_size > 1:
        dist.barrier()  # the other ranks wait for rank 0's val/test sets
    splits = load_splits(data_dir)
    options.splits_digest = file_digest(splits_file)
    if trained_on and options.splits_digest != trained_on:
        raise ValueError(
            f"{splits_file} is not the split the run being resumed trained on (split again since?): "
            "put that split back, or pass the --data-dir that holds it"
        )
    check_split_folders(data_dir, splits)
    made = splits["composer"]
    if made["max_digits"] > model_config.max_digits or made["canvas_size"] != model_config.image_size:
        raise ValueError(
            f"{data_dir} holds {made['canvas_size']}x{made['canvas_size']} images of up to {made['max_digits']} "
            f"digits; this model reads {model_config.image_size}x{model_config.image_size} images of up to "
            f"{model_config.max_digits}: pass a new --data-dir to compose matching val/test sets"
        )
    mnist_images, mnist_labels = load_mnist(options.mnist_root, train=True)
    composer, val_composer = (
        MultiDigitComposer(mnist_images[p], mnist_labels[p], **training_composer(model_config, train_config))
        for p in (np.asarray(splits["pools"]["train"]), np.asarray(splits["pools"]["val"]))
    )
    steps_per_epoch = math.ceil(train_config.train_images / train_config.batch_size)
    train_set = FreshComposites(composer, train_config.train_images, seed=train_config.seed)
    if options.composite_cache:
        train_set = CachedComposites(train_set, options.composite_cache)
    elif job.composing_workers is not None:
        train_set = EpochInMemory(train_set)
    return RunData(
        train_set,
        MultiDigitFolder(data_dir / "val"),
        MultiDigitFolder(data_dir / "test"),
        steps_per_epoch,
        train_config.epochs * steps_per_epoch,
        val_composer,
    )


# ---- model, optimiser and the training state checkpoints hold


@dataclass
class TrainingState:
    """What training changes, step by step, and what last.pt keeps of it for --resume."""

    model: DigitSequenceTransformer  # the weights the optimiser trains
    ema: DigitSequenceTransformer | None  # their moving average, when ema_decay > 0
    optimizer: torch.optim.Optimizer
    objective: nn.Module  # the loss; under torchrun wrapped in DDP, with --compile compiled
    teachers: list[DigitSequenceTransformer] = field(default_factory=list)  # --distill-from's models
    step: int = 0
    seconds_before: float = 0.0  # training time of the processes before this one, when resumed
    best_score: float = -1.0
    wandb_id: str | None = None
    val_metrics: dict = field(default_factory=dict)  # the last validation's, as logged

    @property
    def evaluated(self) -> DigitSequenceTransformer:
        """The weights validated, tested and exported."""
        return self.ema if self.ema is not None else self.model

    @property
    def replicas(self) -> list[nn.Module]:
        """What every rank holds a copy of."""
        return [self.model] + ([self.ema] if self.ema is not None else [])

    def seconds_trained(self, job: RunContext) -> float:
        """The run's training time so far, over every process that trained it."""
        return self.seconds_before + (time.time() - job.started if job.started else 0.0)


def build_training(job: RunContext) -> TrainingState:
    train_config, procs = job.train_config, job.procs
    torch.manual_seed(train_config.seed)  # the same on every rank: the replicas start as one model
    model = DigitSequenceTransformer(job.model_config).to(procs.device)
    if job.options.init_from:
        model.load_state_dict(job.options.init_weights)
    optimizer = configure_optimizer(model, lr=train_config.lr, weight_decay=train_config.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if train_config.ema_decay > 0 else None
    objective: nn.Module = TrainingLoss(
        model,
        label_smoothing=train_config.label_smoothing,
        patch_loss_weight=train_config.patch_loss_weight,
        order_free=train_config.order_free,
        distill_weight=train_config.distill_weight,
    )
    if procs.world_size > 1:
        torch.manual_seed(train_config.seed + procs.rank)  # from here on, each rank draws its own dropout masks
        # Broadcasts rank 0's weights, then averages gradients across ranks during backward().
        device_ids = [procs.device.index] if procs.device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids)
    if job.options.compile:
        objective = torch.compile(objective)
    teachers = [teacher.to(procs.device) for teacher in job.options.teachers]
    return TrainingState(model, ema, optimizer, objective, teachers)


# ---- the training step, an epoch of them, and validation


def learning_rate(step: int, total_steps: int, c: TrainConfig) -> float:
    """Linear warm-up to c.lr, then cosine decay to c.lr * c.min_lr_ratio at total_steps."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, total_steps - c.warmup_steps))
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, *, step: int, decay: float) -> None:
    """ema = d * ema + (1 - d) * weights, BatchNorm statistics included. d ramps up from 0.1 to
    decay over the first steps, so early validations are not dragged back to the initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    pairs = list(zip(ema_model.state_dict().values(), model.state_dict().values()))
    floats = [pair for pair in pairs if pair[0].dtype.is_floating_point]
    # All tensors in one call (a few kernels on a GPU rather than one per tensor).
    torch._foreach_lerp_([averaged for averaged, _ in floats], [current for _, current in floats], 1 - d)
    for averaged, current in pairs:
        if not averaged.dtype.is_floating_point:
            averaged.copy_(current)  # BatchNorm's batch counter


def training_step(job: RunContext, training: TrainingState, data: RunData, batch: tuple) -> tuple[torch.Tensor, float]:
    """One optimiser step on a batch of (images, labels, layouts, ink boxes); (loss, learning rate)."""
    config, device, model_config = job.train_config, job.procs.device, job.model_config
    images, labels, _, boxes = batch
    lr = learning_rate(training.step, data.total_steps, config)
    for group in training.optimizer.param_groups:
        group["lr"] = lr
    labels = list(labels)
    # non_blocking: the copies queue behind the device's work instead of waiting for it, so the
    # next step's kernels are launched while this one's still run on a GPU.
    inputs, targets = (t.to(device, non_blocking=True) for t in encode_labels(labels, model_config.max_digits))
    patch_classes = None
    if config.patch_loss_weight > 0:
        patch_classes = patch_targets(
            boxes, labels, image_size=model_config.image_size, patch_size=model_config.patch_size
        ).to(device, non_blocking=True)
    with job.precision.autocast(device):
        pixels = uint8_to_input(images.to(device, non_blocking=True))
        teacher_probs = teacher_probabilities(training.teachers, pixels, inputs) if training.teachers else None
        loss = training.objective(
            pixels, inputs, targets, patch_classes, labels if config.order_free else None, teacher_probs
        )  # strings would make torch.compile recompile
    training.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(training.model.parameters(), config.grad_clip)
    training.optimizer.step()
    if training.ema is not None:
        update_ema(training.ema, training.model, step=training.step, decay=config.ema_decay)
    training.step += 1
    return loss, lr


def epoch_loader(job: RunContext, training: TrainingState, data: RunData, epoch: int) -> DataLoader:
    """This rank's batches of the rest of the epoch (all of it, unless resumed mid-epoch)."""
    procs, batch_size = job.procs, job.train_config.batch_size
    data.train_set.set_epoch(epoch)  # item i of epoch e is drawn from its own seed [seed, e, i]
    first_batch = training.step - epoch * data.steps_per_epoch
    remaining = Subset(data.train_set, range(first_batch * batch_size, len(data.train_set)))
    # Rank r reads items r, r + world_size, ...: together the ranks' k-th batches are exactly
    # global batch k, as one process would read it. No shuffling: the items are random already.
    sampler = DistributedSampler(remaining, num_replicas=procs.world_size, rank=procs.rank, shuffle=False)
    return DataLoader(
        remaining,
        batch_size=batch_size // procs.world_size,
        sampler=sampler,
        num_workers=job.num_workers,
        worker_init_fn=runs.start_data_worker,
        generator=torch.Generator().manual_seed(epoch),
        pin_memory=procs.device.type == "cuda",  # page-locked batches copy to a GPU without the step waiting
    )


def train_one_epoch(job: RunContext, training: TrainingState, data: RunData, epoch: int, stop: StopSignal) -> bool:
    """Train on the rest of the epoch's batches; True if a stop was asked for or --max-steps reached.
    Every --log-every steps the loss is logged and checked; every --save-every steps last.pt is saved."""
    procs, options = job.procs, job.options
    training.model.train()
    bar = tqdm(
        epoch_loader(job, training, data, epoch),
        desc=f"epoch {epoch + 1}/{job.train_config.epochs}",
        unit="batch",
        disable=not procs.is_main,
        initial=training.step - epoch * data.steps_per_epoch,
        total=data.steps_per_epoch,
    )
    for batch in bar:
        loss, lr = training_step(job, training, data, batch)
        if training.step % options.log_every == 0:
            logged_loss = loss.detach()
            if procs.world_size > 1:
                dist.all_reduce(logged_loss, op=dist.ReduceOp.AVG)  # the mean over ranks, not rank 0's share
            runs.check_finite(training, logged_loss, kept=str(job.out_dir / "last.pt"))
            bar.set_postfix(loss=f"{logged_loss.item():.4f}", lr=f"{lr:.2e}")
            epochs_done = training.step / data.steps_per_epoch
            job.log.log({"train/loss": logged_loss.item(), "train/lr": lr, "epoch": epochs_done}, step=training.step)
        # --max-steps on an epoch's last step lets the epoch end as usual: validated, best.pt kept.
        last_of_epoch = training.step % data.steps_per_epoch == 0
        if stop.agreed() or (0 < options.max_steps <= training.step and not last_of_epoch):
            bar.close()
            return True
        if options.save_every and training.step % options.save_every == 0:
            if procs.world_size > 1:
                runs.align_replicas(*training.replicas)
            runs.save_run_checkpoint("last.pt", job, training)
    bar.close()
    return False


@torch.no_grad()
def validate(
    model: DigitSequenceTransformer, dataset: MultiDigitFolder, procs: Processes, *, precision: Precision, desc: str
) -> tuple[dict, list]:
    """Greedy-read sequence accuracy (exact and order-free, overall, per layout and per length),
    and teacher-forced loss and token accuracy. Under torchrun each rank reads every
    world-size-th image and the counts are gathered, so every rank returns the metrics of the
    whole set (and rank 0's first images, labels and readings as samples)."""
    model.eval()
    images = np.array(dataset.images[procs.rank :: procs.world_size])  # a copy: the memory map is read-only
    records = dataset.records[procs.rank :: procs.world_size]
    labels, layouts = [r["label"] for r in records], [r["layout"] for r in records]
    predictions: list[str] = []
    confidences: list[float] = []
    loss_sum, token_correct, token_total = 0.0, 0, 0
    for start in tqdm(range(0, len(images), 256), desc=desc, unit="batch", leave=False, disable=not procs.is_main):
        batch = torch.from_numpy(images[start : start + 256]).to(procs.device)
        inputs, targets = (
            t.to(procs.device) for t in encode_labels(labels[start : start + 256], model.config.max_digits)
        )
        with precision.autocast(procs.device):
            # What model.read does (encode, then greedy decoding), with the memory encoded once
            # for both the reading and the teacher-forced loss.
            memory = model.encode(uint8_to_input(batch))
            logits = model.decode(memory, inputs).float()
            decoded = model.greedy_decode(memory)
        predictions += [as_read(d, t) for d, t in zip(decoded.strings(), decoded.too_many())]
        confidences += decoded.confidence().tolist()
        loss_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD, reduction="sum").item()
        real = targets != PAD
        token_correct += ((logits.argmax(-1) == targets) & real).sum().item()
        token_total += real.sum().item()
    samples = list(zip(images[:24], labels, predictions))
    expected = [as_expected(label, model.config.max_digits) for label in labels]
    shards = runs.gather((loss_sum, token_correct, token_total, predictions, expected, layouts, confidences), procs)
    loss_sum, token_correct, token_total = (sum(shard[i] for shard in shards) for i in range(3))
    predictions, expected, layouts, confidences = ([x for shard in shards for x in shard[i]] for i in range(3, 7))
    accuracy = SequenceAccuracy()
    accuracy.update(predictions, expected, layouts)
    exact, order_free = accuracy.compute(), accuracy.compute(order_free=True)
    correct = [p == e for p, e in zip(predictions, expected)]
    metrics = {
        "loss": loss_sum / token_total,
        "token_accuracy": token_correct / token_total,
        "sequence_accuracy": exact.pop("all"),
        **{f"sequence_accuracy_{k}": v for k, v in exact.items()},
        "order_free_accuracy": order_free.pop("all"),
        **{f"order_free_accuracy_{k}": v for k, v in order_free.items()},
        "expected_calibration_error": expected_calibration_error(confidences, correct),
    }
    return metrics, samples


def format_metrics(name: str, metrics: dict) -> str:
    parts = [
        f"{name}: sequence accuracy {metrics['sequence_accuracy']:.2%} "
        f"(order-free {metrics['order_free_accuracy']:.2%}, token {metrics['token_accuracy']:.2%}, "
        f"calibration error {metrics['expected_calibration_error']:.2%})"
    ]
    subsets = [
        (k.removeprefix("sequence_accuracy_"), v) for k, v in metrics.items() if k.startswith("sequence_accuracy_")
    ]
    return " | ".join(parts + [f"{subset} {value:.2%}" for subset, value in subsets])


# ---- the whole run


def train(
    options: argparse.Namespace,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    checkpoint: dict | None = None,
    run: object = None,
    after_epoch: Callable[[int, dict], bool] | None = None,
) -> dict:
    """One training run; returns its results ("finished": False when it stopped early, "interrupted"
    when by Ctrl-C or SIGTERM rather than --max-steps), with the last validation metrics under "val"
    by the names they are logged with. checkpoint: the last.pt to resume; run: a wandb run already
    started (by a sweep agent); after_epoch(epoch, validation metrics): False stops the run there
    (a sweep's pruner)."""
    job = runs.start_job(options, model_config, train_config, all_settings(model_config, train_config))
    job.after_epoch = after_epoch
    with runs.run_lock(job.out_dir, job.procs):  # one run per folder, from before anything is written
        data = build_data(job)
        training = build_training(job)
        # A resumed run keeps its thread count: matrix products split over other counts round differently.
        threads = options.threads or (checkpoint or {}).get("training", {}).get("threads")
        if threads:
            torch.set_num_threads(threads)
        job.precision = choose_precision(options.precision, training.model, "train", probe_threads=not threads)
        job.validation_precision = choose_precision(
            options.precision, training.model, "read_batch", probe_threads=False
        )
        if checkpoint is not None:
            runs.restore(training, checkpoint, job.procs)
            if training.step >= data.total_steps and (job.out_dir / "test_metrics.json").is_file():
                job.procs.say(f"{job.out_dir} holds a finished run (model.pt, test_metrics.json): nothing to resume")
                return {"finished": True, "interrupted": False, "step": training.step, "val": training.val_metrics}
            epoch = training.step // data.steps_per_epoch
            job.procs.say(f"resumed from {options.resume} at step {training.step} (epoch {epoch + 1})")
        elif options.init_from:
            job.procs.say(f"starting from the weights of {options.init_from}")
        if options.distill_from:
            job.procs.say(f"distilling {', '.join(options.distill_from)} (weight {train_config.distill_weight})")
        with StopSignal(job.procs) as stop:  # from here on, Ctrl-C stops after a step (or a batch composed)
            if not runs.compose_ahead(job, training, data, stop):
                return {"finished": False, "interrupted": True, "step": training.step, "val": training.val_metrics}
            if job.procs.is_main:  # only once the run can train: a start that failed leaves nothing
                (job.out_dir / "config.json").write_text(json.dumps(job.settings, indent=2) + "\n")
            job.started, job.first_step = time.time(), training.step
            job.procs.say(describe(job, training, data), flush=True)
            job.log = runs.start_wandb(job, training, run)
            finished = run_epochs(job, training, data, stop)
            result = export(job, training, data) if finished else {}
            interrupted = stop.requested()
        job.log.finish()
    stopped = {"finished": finished, "interrupted": interrupted, "settings": job.settings}
    return {**result, **stopped, "step": training.step, "val": training.val_metrics}


def describe(job: RunContext, training: TrainingState, data: RunData) -> str:
    """The model's size, the run's length, where and in which precision it trains, how its data is composed."""
    procs, config = job.procs, job.train_config
    split = f" ({procs.world_size} processes x {config.batch_size // procs.world_size})" if procs.world_size > 1 else ""
    return (
        f"model: {training.model.num_parameters() / 1e6:.2f}M parameters, {job.model_config.grid_size}x"
        f"{job.model_config.grid_size} patches; {config.epochs} epochs x {data.steps_per_epoch} steps of "
        f"{config.batch_size}{split} on {procs.device}, {'bf16 autocast' if job.precision.bf16 else 'fp32'}"
        f"{', compiled' if job.options.compile else ''}"
        + (f", {job.precision.threads} thread{'s' * (job.precision.threads > 1)}" if procs.device.type == "cpu" else "")
        + f"\nprecision: training {job.precision.why}; validation {job.validation_precision.why}"
        + f"\ndata: {runs.composing(job)}"
    )


def run_epochs(job: RunContext, training: TrainingState, data: RunData, stop: StopSignal) -> bool:
    """Train and validate epoch after epoch; whether every epoch ran. Saves last.pt (and best.pt
    when validation improves) at every epoch's end and last.pt when stopped."""
    max_steps = job.options.max_steps
    if training.step >= data.total_steps:  # resumed after the last epoch: its export may not have finished
        job.procs.say(f"all {data.total_steps} steps were trained already: scoring and exporting the final weights")
    while training.step < data.total_steps:
        if 0 < max_steps <= training.step:
            job.procs.say(
                f"stopped at step {training.step} by --max-steps {max_steps}; {job.out_dir / 'last.pt'} holds the "
                "run (continue with --resume)"
            )
            return False
        epoch = training.step // data.steps_per_epoch
        composed = job.composing_workers is None or runs.compose_epoch_first(job, data, epoch, stop)
        stopped = not composed or train_one_epoch(job, training, data, epoch, stop)
        if job.procs.world_size > 1:
            runs.align_replicas(*training.replicas)  # what rank 0 validates and writes is what every rank trained
        if stopped:
            runs.save_run_checkpoint("last.pt", job, training)
            where = "" if composed else f"while composing epoch {epoch + 1}, "
            job.procs.say(
                f"stopped {where}at step {training.step}; saved {job.out_dir / 'last.pt'} (continue with --resume)"
            )
            return False
        end_of_epoch(job, training, data, epoch)
        more = training.step < data.total_steps  # a sweep's pruner can stop a run that has epochs left
        if more and job.after_epoch is not None and not job.after_epoch(epoch + 1, training.val_metrics):
            return False
    return True


def end_of_epoch(job: RunContext, training: TrainingState, data: RunData, epoch: int) -> None:
    """Validate, log (with a table of sample readings) and save."""
    import wandb

    metrics, samples = validate(
        training.evaluated, data.val_set, job.procs, precision=job.validation_precision, desc="validating"
    )
    job.procs.say(f"epoch {epoch + 1}: " + format_metrics("val", metrics))
    job.procs.say(time_left(job, training, data), flush=True)
    training.val_metrics = val_metrics = {f"val/{k}": v for k, v in metrics.items()}  # as wandb and sweeps name them
    if job.procs.is_main:
        table = wandb.Table(columns=["image", "truth", "prediction", "correct"])
        for image, label, prediction in samples:
            table.add_data(wandb.Image(image), label, prediction, label == prediction)
        job.log.log({**val_metrics, "val/samples": table, "epoch": epoch + 1}, step=training.step)
    # An order-free model may read the digits in any order, so exact match would misjudge it.
    score = metrics["order_free_accuracy" if job.train_config.order_free else "sequence_accuracy"]
    if score > training.best_score:  # the same on every rank: the metrics are gathered
        training.best_score = score
        runs.save_run_checkpoint("best.pt", job, training)
    runs.save_run_checkpoint("last.pt", job, training)


def time_left(job: RunContext, training: TrainingState, data: RunData) -> str:
    """How far the run is and, at the pace of this process so far (validation included), when it ends."""
    done, total = training.step, data.total_steps
    seconds = (time.time() - job.started) / max(1, done - job.first_step) * (total - done)
    pace = (done - job.first_step) * job.train_config.batch_size / max(1e-9, time.time() - job.started)
    return (
        f"step {done} of {total} ({done / total:.0%}) at {pace:.0f} img/s: about "
        f"{seconds // 3600:.0f} h {seconds % 3600 / 60:02.0f} min to go, at "
        f"{time.strftime('%H:%M', time.localtime(time.time() + seconds))}"
    )


def calibrate(job: RunContext, training: TrainingState, data: RunData) -> Calibration:
    """The temperature and unsure threshold of the final weights: fitted on validation and on as many
    validation digits composed as training composes them (evaluate.fit_calibration)."""
    val_set, model = data.val_set, training.evaluated.eval()  # eval: BatchNorm reads with its running statistics
    composed = generate(data.val_composer, len(val_set), seed=job.train_config.seed + 1, progress=False)
    calibration = fit_calibration(
        model,
        val_set.images,
        [r["label"] for r in val_set.records],
        composed_as_in_training=(np.stack([c.image for c in composed]), [c.label for c in composed]),
    )
    job.procs.say(
        f"calibrated on validation and on as many validation digits composed as in training: temperature "
        f"{calibration.temperature:.3f}; readings less sure than {calibration.min_confidence:.3f} are unsure"
    )
    return calibration


def export(job: RunContext, training: TrainingState, data: RunData) -> dict:
    """The final weights (averaged, at the end of the cosine decay) on the test set, written to
    test_metrics.json and model.pt. They are what ships, not best.pt's: on a few thousand
    validation images the last epochs differ by a few images, and picking among them picks noise
    (docs/training.md). A sweep trial ranks settings on validation and skips the test set."""
    procs, out_dir = job.procs, job.out_dir
    if procs.world_size > 1:
        procs.say(
            f"replicas identical: the weights and buffers of all {procs.world_size} ranks agreed at every checkpoint"
        )
    runs.check_finite(training, None, kept=str(out_dir / "last.pt"))
    calibration = calibrate(job, training, data)
    test_metrics = None
    if job.options.run_type != "sweep":
        test_metrics, _ = validate(
            training.evaluated, data.test_set, procs, precision=job.validation_precision, desc="testing"
        )
        job.log.summary.update({f"test/{k}": v for k, v in test_metrics.items()})
    wall = training.seconds_trained(job)  # every process's of the run, if it was resumed
    result = {
        "test": test_metrics,
        "train_wall_seconds": wall,
        "train_images_per_second": training.step * job.train_config.batch_size / wall,
        "parameters": training.model.num_parameters(),
        "device": str(procs.device),
        "world_size": procs.world_size,
        "precision": "bf16" if job.precision.bf16 else "fp32",
        "precision_choice": {"train": job.precision.why, "read_batch": job.validation_precision.why},
        "threads": job.precision.threads,
        "init_from": job.options.started_from,
        "distill_from": job.options.distill_from,
        "composite_cache": str(data.train_set.folder) if job.options.composite_cache else None,
        "composed_first": job.composing_workers is not None,
        "calibration": asdict(calibration),
        "settings": job.settings,
    }
    if procs.is_main:
        save_checkpoint(
            out_dir / "model.pt",
            job.model_config,
            training.evaluated.state_dict(),
            train_config=asdict(job.train_config),
            step=training.step,
            metrics={"test": test_metrics},
            calibration=asdict(calibration),
        )
        with Staging() as staging:  # last: a folder with test_metrics.json in it holds a finished run
            staging.file(out_dir / "test_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        if test_metrics is not None:
            print(format_metrics("test", test_metrics))
        print(
            f"wrote {out_dir / 'best.pt'}, {out_dir / 'last.pt'}, {out_dir / 'test_metrics.json'} and "
            f"{out_dir / 'model.pt'} (weights and config only: predict.py --checkpoint, or copy it to "
            "checkpoints/digit_transformer.pt to ship it)"
        )
    return result


# ---- the command line


def build_parser() -> CommandLine:
    p = CommandLine(__doc__)
    add_settings_flags(p, ModelConfig, "model settings (ModelConfig in model.py)", SETTINGS)
    add_settings_flags(p, TrainConfig, "training settings (TrainConfig)", SETTINGS)
    add_run_options(p, RECIPES)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ModelConfig | None, TrainConfig | None]:
    """(run options, model config, train config); with --resume, the configs are the checkpoint's
    and come back as None here. Exits with a usage error (2) for anything impossible."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in SETTINGS}
    options = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in SETTINGS})
    check_run_options(parser, options)
    if options.resume:
        new_run_only = [k for k in ("config", "init_from", "recipe", "distill_from") if getattr(options, k)]
        named = ["--" + k.replace("_", "-") for k in [*given, *new_run_only]]
        if named or options.run_type == "sweep":
            parser.error(
                f"--resume continues a run with the settings saved in it; drop {', '.join(named) or '--run-type'} "
                "(or start a new run in another --out-dir)"
            )
        return options, None, None
    options.wandb = runs.wandb_mode(options.wandb or "auto")  # saved as resolved: a resumed run logs where it began
    try:
        budget = TRIAL_BUDGET if options.run_type == "sweep" else {}
        from_file = read_config_file(options.config, SETTINGS) if options.config else {}
        model_config, train_config = make_configs(
            {**RECIPES[options.recipe or "quick"], **budget, **from_file, **given}
        )
    except ValueError as error:
        parser.error(flag_names(str(error), SETTINGS))
    options.started_from = options.init_from  # kept in the run's checkpoints, so that a resumed run still says it
    options.splits_digest = None  # the data split the run trains on, once build_data has read it
    try:
        if options.init_from:
            options.init_weights = runs.initial_weights(options.init_from, model_config)
        options.teachers = runs.load_teachers(options.distill_from, model_config, train_config)
        options.teacher_digests = [file_digest(Path(path)) for path in options.distill_from]
    except (CheckpointError, ValueError) as error:
        parser.error(str(error))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if train_config.batch_size % world_size:
        parser.error(
            f"--batch-size {train_config.batch_size} is the global batch: "
            f"it must split evenly over {world_size} processes"
        )
    return options, model_config, train_config


def train_trial(argv: list[str], run: object = None, after_epoch: Callable[[int, dict], bool] | None = None) -> dict:
    """A sweep's trial: the training run of this command line (run and after_epoch as in train)."""
    options, model_config, train_config = parse_args(argv)
    return train(options, model_config, train_config, run=run, after_epoch=after_epoch)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done (or stopped and saved), 2 a usage error (flags, settings, a checkpoint or
    data that cannot be used), 1 failed work (a busy run folder, divergence, a write that failed),
    130 aborted by a second Ctrl-C without saving."""
    argv = sys.argv[1:] if argv is None else argv
    options, model_config, train_config = parse_args(argv)
    try:
        if options.run_type == "sweep":
            full_budget = {k: getattr(TrainConfig(), k) for k in ("epochs", "train_images")}
            trial_budget = {"seed": train_config.seed, "epochs": train_config.epochs}
            return sweep(options, argv, trial_budget, train_trial, full_budget)
        checkpoint = None
        if options.resume:
            model_config, train_config, checkpoint = runs.restore_settings(options, TrainConfig)
        else:  # on every process, before any of them can write: torchrun starts them together
            runs.refuse_a_used_run_folder(Path(options.out_dir or runs.DEFAULT_RUN_FOLDER))
        train(options, model_config, train_config, checkpoint=checkpoint)
    except (CheckpointError, MnistUnavailableError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (runs.RunFolderBusyError, runs.TrainingDivergedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a read-only folder, an --out-dir that is a file
        print(
            f"error: {error.strerror or error}: {error.filename or ''} (files already saved are intact)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("aborted without saving", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
