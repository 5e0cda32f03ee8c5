"""Train the digit-sequence Transformer on fresh MNIST composites.

    uv run python train_encoder_decoder.py                             # the quick recipe: under an hour on a CPU
    uv run python train_encoder_decoder.py --recipe full --out-dir runs/full   # 50 epochs: minutes on a GPU
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

Reads top to bottom as stages: settings, processes, data (the digit pools and the val/test sets
are made on the first run), model and optimiser, wandb, then train_one_epoch and validate for
every epoch (fresh composites every epoch, warm-up + cosine learning rate, `last.pt` and
`best.pt` checkpoints), and finally export: the final averaged weights scored on the test set,
written to test_metrics.json and `model.pt`, ready to ship as checkpoints/digit_transformer.pt.
Ctrl-C (or SIGTERM) stops after the current step and saves last.pt; --resume continues exactly,
with the settings saved in the checkpoint.

Under torchrun the same script trains data-parallel (DistributedDataParallel: gloo on CPUs,
nccl on GPUs): --batch-size stays the global batch, split evenly over the processes, so a run
takes the same steps with the same learning-rate schedule whatever the number of processes.
Validation and test sets are split too and the metrics gathered; rank 0 alone prints, logs
to wandb and writes files.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import math
import netrc
import os
import re
import shutil
import signal
import socket
import sys
import time
import typing
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

from evaluate import SequenceAccuracy, as_expected, as_read, expected_calibration_error, fit_calibration
from model import (
    PAD,
    Calibration,
    CheckpointError,
    DigitSequenceTransformer,
    ModelConfig,
    Precision,
    TrainingLoss,
    check_settings,
    choose_precision,
    configure_optimizer,
    encode_labels,
    load_checkpoint,
    load_model,
    patch_targets,
    pick_device,
    save_checkpoint,
    setting,
    teacher_probabilities,
    uint8_to_input,
)
from multidigit_generator import (
    CachedComposites,
    CommandLine,
    FreshComposites,
    MnistUnavailableError,
    MultiDigitComposer,
    MultiDigitFolder,
    check_composer_settings,
    default_mnist_root,
    generate,
    leave_ctrl_c_to_the_parent,
    load_mnist,
    parse_weights,
)
from split_multidigit_dataset import SPLITS_FILE, load_splits, prepare_splits
from sweep_config import SWEEP, TRIAL_BUDGET, sample_trials


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
    thickest_stroke: int = setting(2, "random stroke thickening of up to this many pixels", 1, 3)
    row_tilt: float = setting(8.0, "rows tilted by up to this many degrees", 0.0, 20.0)
    pen_share: float = setting(
        0.25, "share of digits (and marks) redrawn with a round pen, as a drawing pad makes them", 0.0, 1.0
    )
    paper_noise: float = setting(
        0.2, "share of composites on imperfect paper (grey, ruled, speckled, dusty, scanned)", 0.0, 1.0
    )
    touching_share: float = setting(0.2, "share of rows written with touching digits", 0.0, 1.0)
    nondigit_share: float = setting(0.06, 'share of composites holding marks that are not digits, read as ""', 0.0, 1.0)
    overflow_share: float = setting(
        0.04, "share of composites with one or two digits more than max-digits, read as too many", 0.0, 1.0
    )
    elastic_share: float = setting(
        0.0, "share of digits (and marks) bent by an elastic distortion (Simard et al., 2003)", 0.0, 1.0
    )
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


# The two named recipes, as settings over TrainConfig's defaults. quick is the default command,
# about an hour on a 2-core CPU; full trains the shipped model: minutes on a GPU, hours in
# the background on a CPU (docs/training.md has both recipes' figures).
RECIPES = {"quick": {}, "full": {"epochs": 50}}

# The settings a run is made of: every field of both configs except patch_head, which follows
# from patch_loss_weight (a head no loss trains would be dead weight).
MODEL_SETTINGS = [f.name for f in fields(ModelConfig) if f.name != "patch_head"]
TRAIN_SETTINGS = [f.name for f in fields(TrainConfig)]
SETTINGS = MODEL_SETTINGS + TRAIN_SETTINGS


def make_configs(settings: dict) -> tuple[ModelConfig, TrainConfig]:
    """The two configs from a flat dict of settings (missing ones take their defaults); ValueError
    naming the setting for an unknown name or an impossible value or combination."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
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
    weights = train_config.length_weights or [2.0 * n + 1 for n in range(model_config.max_digits + 1)]
    c = train_config
    return dict(
        canvas_size=model_config.image_size,
        max_digits=model_config.max_digits,
        length_weights=weights,
        augment_strength=c.augment_strength,
        digit_height=(c.min_digit_height, c.max_digit_height),
        thickest_stroke=c.thickest_stroke,
        row_tilt=c.row_tilt,
        pen_share=c.pen_share,
        paper_noise=c.paper_noise,
        touching_share=c.touching_share,
        nondigit_share=c.nondigit_share,
        overflow_share=c.overflow_share,
        elastic_share=c.elastic_share,
    )


def add_settings_flags(parser: argparse.ArgumentParser, config_class: type, title: str) -> None:
    """One flag per field of config_class, from its type, default and help. Defaults stay out of
    the parsed arguments (SUPPRESS), so that they hold exactly the settings the user gave."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        if f.name not in SETTINGS:
            continue
        kind, default = hints[f.name], f.default
        shown = ",".join(f"{w:g}" for w in default) if isinstance(default, list) else default
        options = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {shown})")
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float, str):
            options.update(type=kind, choices=f.metadata["choices"] or None)
        else:
            options.update(type=parse_weights, metavar="W0,W1,...")
        group.add_argument("--" + f.name.replace("_", "-"), **options)


def build_parser() -> argparse.ArgumentParser:
    p = CommandLine(__doc__)
    add_settings_flags(p, ModelConfig, "model settings (ModelConfig in model.py)")
    add_settings_flags(p, TrainConfig, "training settings (TrainConfig)")
    add_run_options(p)
    add_starting_point_options(p)
    add_machine_and_logging_options(p)
    return p


def add_run_options(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("run options")
    run.add_argument(
        "--config",
        metavar="FILE",
        help="JSON object of settings, as OUT_DIR/config.json and a sweep's "
        'best_config.json hold ({"lr": 0.002, "d_model": 96, ...}); flags given on the command line win',
    )
    run.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        help="quick (the default): the defaults below; full: the recipe meant for the shipped model ("
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in RECIPES["full"].items())
        + "); --config and flags change either",
    )
    run.add_argument(
        "--run-type",
        choices=("train", "sweep"),
        default="train",
        help="sweep: train one trial after another with settings from sweep_config.py (online with a W&B "
        "login, else sampled here), print a summary and write the best settings to best_config.json",
    )
    run.add_argument(
        "--count", type=int, help="sweep: number of trials (default: 8; a grid sweep: all its combinations)"
    )
    run.add_argument(
        "--out-dir",
        help="last.pt, best.pt, config.json, test_metrics.json and model.pt go here "
        "(default: runs/default, or the folder of the checkpoint given to --resume)",
    )
    run.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="stop (and save last.pt) after this many steps, the schedule unchanged; 0: run all epochs",
    )
    run.add_argument(
        "--save-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also save last.pt every STEPS steps, so that a crash loses at most that many (default 0: at each "
        "epoch's end only)",
    )
    run.add_argument(
        "--data-dir", help="holds splits.json, val/ and test/; made on first use (default: data, or the resumed run's)"
    )
    run.add_argument(
        "--mnist-root", default=default_mnist_root(), help="folder with MNIST/raw/ (default: $MNIST_ROOT or data)"
    )


def add_starting_point_options(p: argparse.ArgumentParser) -> None:
    start = p.add_argument_group("where a run starts (default: random weights)")
    start.add_argument(
        "--resume", metavar="CHECKPOINT", help="continue the run saved in this last.pt, with its settings"
    )
    start.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start from the weights of this checkpoint (a model.pt or last.pt of the same model settings) "
        "instead of random ones; the optimiser and the learning-rate schedule start afresh",
    )
    start.add_argument(
        "--distill-from",
        nargs="+",
        default=[],
        metavar="CHECKPOINT",
        help="distil these trained models (an ensemble of one or more, of any size) into the one trained here: "
        "the token loss also matches their averaged probabilities (--distill-weight)",
    )


def add_machine_and_logging_options(p: argparse.ArgumentParser) -> None:
    machine = p.add_argument_group("machine and logging options")
    machine.add_argument(
        "--num-workers",
        type=int,
        help="processes composing training images (default: composing alongside, 1 on a CPU and all of a "
        "process's share of the cores but one on a GPU; composing first, all of its share)",
    )
    machine.add_argument(
        "--compose",
        choices=("auto", "alongside", "first"),
        default="auto",
        help="alongside: worker processes compose the next batches while the model trains; first: every "
        "epoch is composed with every core just before it is trained on, into OUT_DIR/composing, and "
        "deleted after it; auto: first on a CPU with one training process (alongside, the composing workers "
        "slow the training threads sharing their cores), alongside otherwise. --composite-cache composes "
        "every epoch first and keeps them",
    )
    machine.add_argument(
        "--composite-cache",
        metavar="DIR",
        help="compose the run's training epochs once, with every core, into DIR (memory-mapped dataset folders "
        "named for the training world and seed), then train from them: the same images as composing while "
        "training, and any later run of the same world and seed reuses them (sweeps; a GPU that composing "
        "would hold back)",
    )
    machine.add_argument(
        "--threads",
        type=int,
        help="PyTorch threads on a CPU (default: PyTorch's count, or fewer where a busy CPU was timed "
        "faster with fewer; a resumed run keeps its count, so that it continues bit for bit)",
    )
    machine.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps ... "
        "(under torchrun, each process takes the GPU of its LOCAL_RANK)",
    )
    machine.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16: matrix products in bfloat16 under autocast (weights, optimiser and loss stay fp32); "
        "auto: bf16 where a short timing of this model's training step (and of its reading, for validation) "
        "on this machine finds it faster, cached per machine; on a busy CPU also fewer threads where faster "
        "(model.choose_precision)",
    )
    machine.add_argument(
        "--compile", action="store_true", help="train through torch.compile (a minute or so of compiling first)"
    )
    machine.add_argument(
        "--wandb",
        choices=("auto", "online", "offline", "disabled"),
        help="auto (the default): online when logged in to W&B, offline otherwise; a resumed run keeps its run's",
    )
    machine.add_argument(
        "--offline", dest="wandb", action="store_const", const="offline", help="the same as --wandb offline"
    )
    machine.add_argument("--wandb-project", default="digit-sequence-transformer")
    machine.add_argument("--log-every", type=int, default=25, help="steps between training-loss logs")


def cache_folder_problem(path: str) -> str | None:
    """What stops --composite-cache's path from being a folder to write in (made if need be), or None."""
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    if not path or not existing.is_dir():
        return f"--composite-cache {path!r}: {existing} is not a folder; name a folder to keep epochs in"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--composite-cache {path}: {existing} cannot be written to"
    return None


def flag_names(message: str) -> str:
    """A settings error as the command line spells it: d_model -> --d-model."""
    return re.sub(r"\b(" + "|".join(SETTINGS) + r")\b", lambda m: "--" + m[1].replace("_", "-"), message)


def read_config_file(path: str) -> dict:
    """The settings in a --config file; ValueError saying what is wrong with it."""
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--config {path}: {error}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"--config {path}: not settings: {', '.join(unknown)}")
    return settings


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ModelConfig | None, TrainConfig | None]:
    """(run options, model config, train config); with --resume, the configs are the checkpoint's
    and come back as None here. Exits with a usage error (2) for anything impossible."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in SETTINGS}
    options = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in SETTINGS})
    check_run_options(parser, options)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if options.resume:
        started = options.init_from or options.distill_from or options.recipe
        if given or options.config or options.run_type == "sweep" or started:
            named = [flag_names(k) for k in given] + ["--config"] * bool(options.config)
            named += ["--init-from"] * bool(options.init_from) + ["--recipe"] * bool(options.recipe)
            named += ["--distill-from"] * bool(options.distill_from)
            parser.error(
                f"--resume continues a run with the settings saved in it; drop {', '.join(named) or '--run-type'} "
                "(or start a new run in another --out-dir)"
            )
        return options, None, None
    options.wandb = wandb_mode(options.wandb or "auto")  # saved as resolved: a resumed run logs where it began
    try:
        budget = TRIAL_BUDGET if options.run_type == "sweep" else {}
        model_config, train_config = make_configs(
            {
                **RECIPES[options.recipe or "quick"],
                **budget,
                **(read_config_file(options.config) if options.config else {}),
                **given,
            }
        )
    except ValueError as error:
        parser.error(flag_names(str(error)))
    options.started_from = options.init_from  # kept in the run's checkpoints, so that a resumed run still says it
    try:
        if options.init_from:
            options.init_weights = initial_weights(options.init_from, model_config)
        options.teachers = load_teachers(options.distill_from, model_config, train_config)
    except (CheckpointError, ValueError) as error:
        parser.error(str(error))
    if train_config.batch_size % world_size:
        parser.error(
            f"--batch-size {train_config.batch_size} is the global batch: "
            f"it must split evenly over {world_size} processes"
        )
    return options, model_config, train_config


def check_run_options(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    """Exit with a usage error for run options no run can take."""
    for name in ("max_steps", "num_workers", "log_every", "save_every", "threads"):
        least = 1 if name in ("log_every", "threads") else 0
        value = getattr(options, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    if options.count is not None and (options.count < 1 or options.run_type != "sweep"):
        parser.error(f"--count is the number of sweep trials: at least 1, with --run-type sweep (got {options.count})")
    try:
        pick_device(options.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    if options.composite_cache is not None and (problem := cache_folder_problem(options.composite_cache)):
        parser.error(problem)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and options.run_type == "sweep":
        parser.error("a sweep runs its trials one after another in one process: start it without torchrun")


def restore_settings(options: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, dict]:
    """The configs and the checkpoint of the run to resume; --out-dir defaults to its folder."""
    checkpoint = load_checkpoint(options.resume)
    if "training" not in checkpoint:
        raise CheckpointError(
            f"{options.resume} holds a model's weights only (an exported model.pt or a shipped "
            "model): resume from a run's last.pt, which also holds the optimiser state"
        )
    try:
        train_config = TrainConfig(**checkpoint["train_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{options.resume}: unusable train_config ({error})") from error
    options.out_dir = options.out_dir or str(Path(options.resume).parent)
    options.data_dir = options.data_dir or checkpoint["training"]["data_dir"]
    options.started_from = checkpoint["training"].get("init_from")
    options.distill_from = checkpoint["training"].get("distill_from", [])
    options.teachers = load_teachers(options.distill_from, checkpoint["model_config"], train_config)
    options.wandb = options.wandb or checkpoint["training"].get("wandb", "auto")
    options.composite_cache = options.composite_cache or checkpoint["training"].get("composite_cache")
    return checkpoint["model_config"], train_config, checkpoint


# ---- processes: one, or one per torchrun worker; rank 0 prints, logs and saves


@dataclass
class Processes:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, *args: object, **kwargs: object) -> None:
        if self.is_main:
            print(*args, **kwargs)


def start_processes(requested_device: str) -> Processes:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous address); without them
    this is a single process of rank 0."""
    device = pick_device(requested_device)
    if "RANK" not in os.environ:
        return Processes(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
    )
    return Processes(device, dist.get_rank(), dist.get_world_size())


@dataclass
class Job:
    """What every stage of one training run reads: its settings, its processes, where it writes."""

    options: argparse.Namespace
    model_config: ModelConfig
    train_config: TrainConfig
    procs: Processes
    out_dir: Path
    num_workers: int  # processes feeding the training steps
    # Composing first (--compose): the processes composing each epoch before it is trained on; None: not so.
    composing_workers: int | None = None
    log: object = None  # the wandb run
    # How training steps and validation readings run here, chosen by timing them (model.choose_precision).
    precision: Precision | None = None
    validation_precision: Precision | None = None
    started: float = 0.0  # when this process started training, and at which step: the ETA's basis
    first_step: int = 0

    @property
    def bf16(self) -> bool:
        return self.precision.bf16

    @property
    def settings(self) -> dict:
        return all_settings(self.model_config, self.train_config)


def start_job(options: argparse.Namespace, model_config: ModelConfig, train_config: TrainConfig) -> Job:
    """Start the processes and pick the data workers."""
    procs = start_processes(options.device)
    options.data_dir = options.data_dir or "data"
    out_dir = Path(options.out_dir or "runs/default")
    # A CPU composes each epoch first, with every core, then trains on it: a worker composing
    # alongside took a third of the speed of the training threads whose cores it shared, and the
    # training process reads a composed epoch itself at a hundredth of composing's cost. A GPU
    # takes all the composing its cores can give, alongside (docs/performance.md), or, reading
    # composed epochs (--composite-cache), two workers. The processes of a torchrun compose
    # alongside unless asked: one epoch at a time, all but one of them would wait for it.
    compose_first = not options.composite_cache and (
        options.compose == "first"
        or (options.compose == "auto" and procs.device.type == "cpu" and procs.world_size == 1)
    )
    if compose_first:
        composing_workers = cores_per_process() if options.num_workers is None else options.num_workers
        return Job(options, model_config, train_config, procs, out_dir, 0, composing_workers)
    num_workers = options.num_workers
    if num_workers is None:
        num_workers = max(1, cores_per_process() - 1) if procs.device.type != "cpu" else 1
        num_workers = min(num_workers, 2) if options.composite_cache else num_workers
    return Job(options, model_config, train_config, procs, out_dir, num_workers)


def cores_per_process() -> int:
    """Each process on a machine takes its share of the cores."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class RunFolderBusyError(RuntimeError):
    """Another training run holds the run folder."""


class RunLock:
    """One training run per folder: rank 0 holds an exclusive lock on OUT_DIR/.lock while it trains,
    so that a second run into the same folder stops at once, naming the first, instead of the two
    overwriting each other's checkpoints. The operating system drops the lock when its process
    ends, however it ends, so a crashed run leaves nothing stale behind."""

    def __init__(self, folder: Path, procs: Processes):
        self.path, self.procs, self.file = folder / ".lock", procs, None

    def __enter__(self) -> RunLock:
        if not self.procs.is_main:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")  # held open for the whole run
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunFolderBusyError(
                f"{self.path.parent} is in use by another training run ({holder}): wait for it to "
                "finish, stop it, or give this run another --out-dir"
            ) from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()
        return self

    def __exit__(self, *exception: object) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the lock


class TrainingDivergedError(RuntimeError):
    """The loss or the weights stopped being finite numbers."""


def check_finite(training: Training, loss: torch.Tensor | None, kept: str) -> None:
    """Stop a run whose loss or weights became NaN or infinite before anything is saved from it:
    raise TrainingDivergedError saying where, what is kept, and what to try."""
    weights_ok = all(torch.isfinite(p).all() for p in training.model.parameters())
    if weights_ok and (loss is None or torch.isfinite(loss).all()):
        return
    what = "the weights" if not weights_ok else "the loss"
    raise TrainingDivergedError(
        f"training diverged: {what} became NaN or infinite by step {training.step}; nothing was "
        f"saved from it, and {kept} keeps the last good state. Try a lower --lr, a --grad-clip, "
        "or --precision fp32, then --resume or start again"
    )


def align_replicas(*modules: nn.Module) -> None:
    """Before anything is validated or saved: copy rank 0's buffers (BatchNorm running
    statistics) to every rank, then compare every weight and buffer across ranks. Gradients
    are averaged, so the weights agree; the running statistics are each rank's own (DDP
    broadcasts rank 0's before every forward, and the forward then updates them). Replicas
    that still differ mean a bug, and would make the saved rank-0 weights a different model
    from the one trained."""
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
    flat = torch.cat([t.detach().double().flatten() for module in modules for t in module.state_dict().values()])
    replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(replicas, flat)
    differing = [rank for rank, other in enumerate(replicas) if not torch.equal(other, replicas[0])]
    if differing:
        raise RuntimeError(f"data-parallel replicas diverged: ranks {differing} hold weights that differ from rank 0's")


def gather(value: object, procs: Processes) -> list:
    """Every rank's value, in rank order."""
    if procs.world_size == 1:
        return [value]
    values = [None] * procs.world_size
    dist.all_gather_object(values, value)
    return values


class StopSignal:
    """Ctrl-C or SIGTERM (a cluster's preemption notice; torchrun passes Ctrl-C on to its
    workers) asks the loop to stop after the current step and save. The terminal (and `uv run`,
    which forwards it) may deliver one press more than once, so only a press more than two
    seconds after the first aborts at once, without saving."""

    def __init__(self, procs: Processes):
        self.procs, self.requested_at = procs, None
        # The flag travels over gloo even between GPUs: a CPU tensor, no GPU synchronisation per step.
        self.group = dist.new_group(backend="gloo") if procs.world_size > 1 else None

    def __enter__(self) -> StopSignal:
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exception: object) -> None:
        for signum, handler in self.previous.items():  # a sweep's next trial, or the caller, gets them back
            signal.signal(signum, handler)

    def request(self, signum: int, frame: object) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            if self.procs.is_main:
                print(
                    "\nstopping after this step, or this batch of composing (Ctrl-C again to abort without saving)",
                    file=sys.stderr,
                )
        elif time.monotonic() - self.requested_at > 2:
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        """Whether any rank was asked to stop: all ranks must leave the loop at the same step."""
        flag = torch.tensor([self.requested_at is not None], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag)


def start_data_worker(worker_id: int) -> None:
    leave_ctrl_c_to_the_parent(worker_id)
    # The lowest priority: where cores are short, training threads preempted by a worker stall
    # each other, while the worker composes ahead in the gaps they leave (docs/performance.md).
    os.nice(19)


# ---- data: disjoint digit pools; val/test are fixed folders, train is composed fresh each epoch

COMPOSING_FOLDER = "composing"  # in the run's folder: the epoch being trained on, when composing first


@dataclass
class Data:
    train_set: FreshComposites | CachedComposites
    val_set: MultiDigitFolder
    test_set: MultiDigitFolder
    steps_per_epoch: int
    total_steps: int
    val_composer: MultiDigitComposer  # validation digits composed as training composes: calibration's harder half


def build_data(job: Job) -> Data:
    options, model_config, train_config, procs = job.options, job.model_config, job.train_config, job.procs
    data_dir = Path(options.data_dir)
    if procs.is_main and not (data_dir / SPLITS_FILE).is_file():
        print(f"{data_dir / SPLITS_FILE} not found: splitting MNIST and composing val/test sets")
        prepare_splits(
            data_dir,
            mnist_root=options.mnist_root,
            composer=dict(max_digits=model_config.max_digits, canvas_size=model_config.image_size),
        )
    if procs.world_size > 1:
        dist.barrier()  # the other ranks wait for rank 0's val/test sets
    splits = load_splits(data_dir)
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
    cache = options.composite_cache or (job.out_dir / COMPOSING_FOLDER if job.composing_workers is not None else None)
    return Data(
        CachedComposites(train_set, cache) if cache else train_set,
        MultiDigitFolder(data_dir / "val"),
        MultiDigitFolder(data_dir / "test"),
        steps_per_epoch,
        train_config.epochs * steps_per_epoch,
        val_composer,
    )


# ---- model, optimiser and the training state checkpoints hold


@dataclass
class Training:
    model: DigitSequenceTransformer  # the weights the optimiser trains
    ema: DigitSequenceTransformer | None  # their moving average, when ema_decay > 0
    optimizer: torch.optim.Optimizer
    objective: nn.Module  # the loss; under torchrun wrapped in DDP, with --compile compiled
    teachers: list[DigitSequenceTransformer] = field(default_factory=list)  # --distill-from's models
    step: int = 0
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


def build_training(job: Job) -> Training:
    train_config, procs = job.train_config, job.procs
    torch.manual_seed(train_config.seed)  # the same on every rank: the replicas start as one model
    model = DigitSequenceTransformer(job.model_config).to(procs.device)
    if job.options.init_from:
        model.load_state_dict(job.options.init_weights)
    optimizer = configure_optimizer(model, lr=train_config.lr, weight_decay=train_config.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if train_config.ema_decay > 0 else None
    if procs.world_size > 1:
        torch.manual_seed(train_config.seed + procs.rank)  # from here on, each rank draws its own dropout masks
    objective: nn.Module = TrainingLoss(
        model,
        label_smoothing=train_config.label_smoothing,
        patch_loss_weight=train_config.patch_loss_weight,
        order_free=train_config.order_free,
        distill_weight=train_config.distill_weight,
    )
    if procs.world_size > 1:
        # Broadcasts rank 0's weights, then averages gradients across ranks during backward().
        device_ids = [procs.device.index] if procs.device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids)
    if job.options.compile:
        objective = torch.compile(objective)
    teachers = [teacher.to(procs.device) for teacher in job.options.teachers]
    return Training(model, ema, optimizer, objective, teachers)


def load_named_checkpoint(flag: str, path: str, load: typing.Callable[[str], typing.Any]) -> typing.Any:
    """What load makes of the checkpoint a flag names; ValueError naming the flag if it cannot."""
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        return load(path)
    except CheckpointError as error:
        raise ValueError(f"{flag} {error}") from None


def initial_weights(path: str, config: ModelConfig) -> dict:
    """The weights a checkpoint reads with (the averaged ones), for a model of this config;
    ValueError saying what stands in the way. Checked before the run writes or composes anything."""
    checkpoint = load_named_checkpoint("--init-from", path, load_checkpoint)
    if checkpoint["model_config"] != config:
        different = [k for k, v in asdict(config).items() if asdict(checkpoint["model_config"])[k] != v]
        raise ValueError(f"--init-from {path}: its model differs from this run's in {', '.join(different)}")
    try:
        DigitSequenceTransformer(config).load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:
        raise ValueError(f"--init-from {path}: weights that do not fit its own settings") from error
    return checkpoint["model"]


def load_teachers(paths: list[str], config: ModelConfig, train_config: TrainConfig) -> list[DigitSequenceTransformer]:
    """The models --distill-from names, on the CPU, frozen; ValueError naming one that cannot
    teach this model. Checked before the run writes or composes anything."""
    if paths and train_config.order_free:
        raise ValueError("--distill-from teaches token by token in reading order: it does not go with --order-free")
    teachers = []
    for path in paths:
        teacher = load_named_checkpoint("--distill-from", path, lambda p: load_model(p, "cpu", precision="fp32"))
        if (teacher.config.image_size, teacher.config.max_digits) != (config.image_size, config.max_digits):
            raise ValueError(
                f"--distill-from {path}: it reads {teacher.config.image_size}px canvases of up to "
                f"{teacher.config.max_digits} digits, this model {config.image_size}px and {config.max_digits}"
            )
        teachers.append(teacher.requires_grad_(False))
    return teachers


def random_state(device: torch.device) -> list[torch.Tensor]:
    """This process's torch random state (dropout's): the CPU generator's, and the GPU's on a GPU."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def restore(training: Training, checkpoint: dict, procs: Processes) -> None:
    """Continue exactly where last.pt stopped: weights, averaged weights, optimiser, step and
    each rank's random state (on another number of processes, reseeded: the dropout masks of
    a different split of the batch cannot be replayed)."""
    state = checkpoint["training"]
    training.model.load_state_dict(state["weights"])
    if training.ema is not None:
        training.ema.load_state_dict(checkpoint["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.step, training.best_score, training.wandb_id = checkpoint["step"], state["best_score"], state["wandb_id"]
    training.val_metrics = checkpoint["metrics"]["val"]
    saved = state["random_states"]
    if len(saved) == procs.world_size:
        torch.set_rng_state(saved[procs.rank][0])
        if procs.device.type == "cuda" and len(saved[procs.rank]) > 1:
            torch.cuda.set_rng_state(saved[procs.rank][1], procs.device)
    else:
        torch.manual_seed(checkpoint["train_config"]["seed"] + procs.rank + procs.world_size * training.step)


def save_run_checkpoint(name: str, job: Job, training: Training) -> None:
    """OUT_DIR/name (last.pt, best.pt): the model_config, train_config and weights to read with, as
    every checkpoint has them, plus what --resume needs. Every rank calls it (the random states
    are gathered); rank 0 writes. Weights that are no longer finite are never written."""
    check_finite(training, None, kept=str(job.out_dir / name))
    random_states = gather(random_state(job.procs.device), job.procs)
    if job.procs.is_main:
        save_checkpoint(
            job.out_dir / name,
            job.model_config,
            training.evaluated.state_dict(),
            train_config=asdict(job.train_config),
            step=training.step,
            metrics={"val": training.val_metrics},
            training={
                "weights": training.model.state_dict(),
                "optimizer": training.optimizer.state_dict(),
                "best_score": training.best_score,
                "random_states": random_states,
                "wandb_id": training.wandb_id,
                "data_dir": str(job.options.data_dir),
                "threads": torch.get_num_threads(),
                "init_from": job.options.started_from,
                "distill_from": job.options.distill_from,
                "wandb": job.options.wandb,
                "composite_cache": job.options.composite_cache,
            },
        )


def start_wandb(job: Job, training: Training, run: object = None) -> object:
    """A wandb run logging every setting (offline without a W&B login; disabled on ranks > 0), or
    the sweep agent's run given, updated with them."""
    import wandb  # imported here: slow to import, and not needed for --help

    logged = {
        **job.settings,
        **vars(job.options),
        "parameters": training.model.num_parameters(),
        "world_size": job.procs.world_size,
    }
    if run is None:
        mode = wandb_mode(job.options.wandb) if job.procs.is_main else "disabled"
        run = wandb.init(
            project=job.options.wandb_project, mode=mode, id=training.wandb_id, resume="allow", config=logged
        )
    else:
        run.config.update(logged, allow_val_change=True)
    training.wandb_id = run.id
    return run


def wandb_mode(requested: str) -> str:
    """'auto' means online when W&B credentials exist (WANDB_API_KEY or ~/.netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


# ---- one epoch of training, and validation


def learning_rate(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr_ratio: float) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def epoch_loader(
    data: Data, epoch: int, training: Training, batch_size: int, procs: Processes, num_workers: int
) -> DataLoader:
    """This rank's batches of the rest of the epoch (all of it, unless resumed mid-epoch)."""
    data.train_set.set_epoch(epoch)  # item i of epoch e is drawn from its own seed [seed, e, i]
    first_batch = training.step - epoch * data.steps_per_epoch
    remaining = Subset(data.train_set, range(first_batch * batch_size, len(data.train_set)))
    # Rank r reads items r, r + world_size, ...: together the ranks' k-th batches are exactly
    # global batch k, as one process would read it. No shuffling: the items are random already.
    sampler = (
        DistributedSampler(remaining, num_replicas=procs.world_size, rank=procs.rank, shuffle=False)
        if procs.world_size > 1
        else None
    )
    return DataLoader(
        remaining,
        batch_size=batch_size // procs.world_size,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=start_data_worker,
        generator=torch.Generator().manual_seed(epoch),
        pin_memory=procs.device.type == "cuda",  # page-locked batches copy to a GPU without the step waiting
    )


def train_one_epoch(job: Job, training: Training, data: Data, epoch: int, stop: StopSignal) -> bool:
    """Train on the rest of the epoch's batches; True if a stop was asked for or --max-steps reached.
    Every --log-every steps the loss is logged and checked; every --save-every steps last.pt is saved."""
    procs, options = job.procs, job.options
    loader = epoch_loader(data, epoch, training, job.train_config.batch_size, procs, job.num_workers)
    training.model.train()
    bar = tqdm(
        loader,
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
            check_finite(training, logged_loss, kept=str(job.out_dir / "last.pt"))
            bar.set_postfix(loss=f"{logged_loss.item():.4f}", lr=f"{lr:.2e}")
            epochs_done = training.step / data.steps_per_epoch
            job.log.log({"train/loss": logged_loss.item(), "train/lr": lr, "epoch": epochs_done}, step=training.step)
        if stop.agreed() or 0 < options.max_steps <= training.step:
            bar.close()
            return True
        if options.save_every and training.step % options.save_every == 0:
            if procs.world_size > 1:
                align_replicas(*training.replicas)
            save_run_checkpoint("last.pt", job, training)
    bar.close()
    return False


def training_step(job: Job, training: Training, data: Data, batch: tuple) -> tuple[torch.Tensor, float]:
    """One optimiser step on a batch of (images, labels, layouts, ink boxes); (loss, learning rate)."""
    config, device, model_config = job.train_config, job.procs.device, job.model_config
    images, labels, _, boxes = batch
    lr = learning_rate(
        training.step,
        total_steps=data.total_steps,
        warmup_steps=config.warmup_steps,
        lr=config.lr,
        min_lr_ratio=config.min_lr_ratio,
    )
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


@torch.no_grad()
def validate(
    model: DigitSequenceTransformer, dataset: MultiDigitFolder, procs: Processes, *, precision: Precision, desc: str
) -> tuple[dict, list]:
    """Greedy-read sequence accuracy (exact and order-free, overall, per layout and per length),
    and teacher-forced loss and token accuracy. Under torchrun each rank reads every
    world-size-th image and the counts are gathered, so every rank returns the metrics of the
    whole set (and rank 0's first images, labels and readings as samples)."""
    model.eval()
    shard = list(range(procs.rank, len(dataset), procs.world_size))
    images = np.array(dataset.images[procs.rank :: procs.world_size])  # a copy: the memory map is read-only
    labels = [dataset.records[i]["label"] for i in shard]
    layouts = [dataset.records[i]["layout"] for i in shard]
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
    accuracy = SequenceAccuracy()
    expected = [as_expected(label, model.config.max_digits) for label in labels]
    shards = gather((loss_sum, token_correct, token_total, predictions, expected, layouts, confidences), procs)
    for shard_result in shards:
        accuracy.update(*shard_result[3:6])
    loss_sum, token_correct, token_total = (sum(shard_result[i] for shard_result in shards) for i in range(3))
    correct = [p == e for shard_result in shards for p, e in zip(shard_result[3], shard_result[4])]
    all_confidences = [c for shard_result in shards for c in shard_result[6]]
    exact, order_free = accuracy.compute(), accuracy.compute(order_free=True)
    metrics = {
        "loss": loss_sum / token_total,
        "token_accuracy": token_correct / token_total,
        "sequence_accuracy": exact.pop("all"),
        **{f"sequence_accuracy_{k}": v for k, v in exact.items()},
        "order_free_accuracy": order_free.pop("all"),
        **{f"order_free_accuracy_{k}": v for k, v in order_free.items()},
        "expected_calibration_error": expected_calibration_error(all_confidences, correct),
    }
    samples = list(zip(images[:24], labels, predictions))
    return metrics, samples


def format_metrics(name: str, metrics: dict) -> str:
    parts = [
        f"{name}: sequence accuracy {metrics['sequence_accuracy']:.2%} "
        f"(order-free {metrics['order_free_accuracy']:.2%}, token {metrics['token_accuracy']:.2%}, "
        f"calibration error {metrics['expected_calibration_error']:.2%})"
    ]
    parts += [
        f"{k.removeprefix('sequence_accuracy_')} {v:.2%}"
        for k, v in metrics.items()
        if k.startswith("sequence_accuracy_")
    ]
    return " | ".join(parts)


# ---- the whole run


def train(
    options: argparse.Namespace,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    checkpoint: dict | None = None,
    run: object = None,
) -> dict:
    """One training run; returns its results ("finished": False when it stopped early), with the
    last validation metrics under "val" by the names they are logged with. checkpoint: the
    last.pt to resume; run: a wandb run already started (by a sweep agent)."""
    job = start_job(options, model_config, train_config)
    with RunLock(job.out_dir, job.procs):  # one run per folder, from before anything is written
        if job.procs.is_main:
            (job.out_dir / "config.json").write_text(json.dumps(job.settings, indent=2) + "\n")
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
            restore(training, checkpoint, job.procs)
            epoch = training.step // data.steps_per_epoch
            job.procs.say(f"resumed from {options.resume} at step {training.step} (epoch {epoch + 1})")
        elif options.init_from:
            job.procs.say(f"starting from the weights of {options.init_from}")
        if options.distill_from:
            job.procs.say(f"distilling {', '.join(options.distill_from)} (weight {train_config.distill_weight})")
        with StopSignal(job.procs) as stop:  # from here on, Ctrl-C stops after a step (or a batch composed)
            if not compose_ahead(job, training, data, stop):
                return {"finished": False, "step": training.step, "val": training.val_metrics}
            job.started, job.first_step = time.time(), training.step
            job.procs.say(describe(job, training, data), flush=True)
            job.log = start_wandb(job, training, run)
            finished = run_epochs(job, training, data, stop)
            wall = time.time() - job.started
            result = export(job, training, data, wall=wall, steps=training.step - job.first_step) if finished else {}
        job.log.finish()
    return {**result, "finished": finished, "step": training.step, "val": training.val_metrics}


def compose_ahead(job: Job, training: Training, data: Data, stop: StopSignal) -> bool:
    """With --composite-cache, compose the epochs this run is still to train (up to --max-steps)
    that are not cached yet, with every core; the processes of a torchrun share them out. False
    if asked to stop first."""
    if not isinstance(data.train_set, CachedComposites) or job.composing_workers is not None:
        return True
    procs, folder = job.procs, data.train_set.folder
    last = job.train_config.epochs
    if job.options.max_steps:
        last = min(last, math.ceil(job.options.max_steps / data.steps_per_epoch))
    epochs = range(training.step // data.steps_per_epoch, last)
    if not epochs:
        return True
    missing = data.train_set.missing(epochs)
    procs.say(
        f"training epochs {epochs.start + 1}-{epochs.stop} from {folder}: "
        + (f"composing {len(missing)} of them" if missing else "all composed already")
    )
    data.train_set.compose(
        missing,
        workers=cores_per_process(),
        progress=procs.is_main,
        stopped=lambda: stop.requested_at is not None,  # this process's own flag: agreed() is collective
    )
    if procs.world_size > 1:
        dist.barrier()
    if stop.agreed():
        procs.say(f"stopped while composing; the epochs composed so far stay in {folder} for the next run")
        return False
    return True


def compose_epoch_first(job: Job, data: Data, epoch: int, stop: StopSignal) -> bool:
    """Compose the epoch (unless a stopped run left it whole) into OUT_DIR/composing with
    --num-workers processes, before it is trained on; False if asked to stop meanwhile."""
    data.train_set.compose(
        [epoch],
        workers=job.composing_workers,
        progress=job.procs.is_main,
        stopped=lambda: stop.requested_at is not None,
    )
    return not stop.agreed()


def drop_composed_epoch(job: Job) -> None:
    """Delete the epoch just trained on, its lock files too, once every process is past it."""
    if job.procs.world_size > 1:
        dist.barrier()
    if job.procs.is_main and (job.out_dir / COMPOSING_FOLDER).exists():
        shutil.rmtree(job.out_dir / COMPOSING_FOLDER)
    if job.procs.world_size > 1:
        dist.barrier()  # before any process takes the next epoch's lock


def describe(job: Job, training: Training, data: Data) -> str:
    """The model's size, the run's length, where and in which precision it trains, how its data is composed."""
    procs, config = job.procs, job.train_config
    split = f" ({procs.world_size} processes x {config.batch_size // procs.world_size})" if procs.world_size > 1 else ""
    return (
        f"model: {training.model.num_parameters() / 1e6:.2f}M parameters, {job.model_config.grid_size}x"
        f"{job.model_config.grid_size} patches; {config.epochs} epochs x {data.steps_per_epoch} steps of "
        f"{config.batch_size}{split} on {procs.device}, {'bf16 autocast' if job.bf16 else 'fp32'}"
        f"{', compiled' if job.options.compile else ''}"
        + (f", {job.precision.threads} thread{'s' * (job.precision.threads > 1)}" if procs.device.type == "cpu" else "")
        + f"\nprecision: training {job.precision.why}; validation {job.validation_precision.why}"
        + f"\ndata: {composing(job)}"
    )


def composing(job: Job) -> str:
    """How the training images are composed, as the run's log says it."""
    if job.options.composite_cache:
        return f"every epoch composed first and kept in {job.options.composite_cache}"

    def by(workers: int) -> str:
        return f"by {workers} worker process{'es' * (workers > 1)}" if workers else "in the training process"

    if job.composing_workers is not None:
        return f"each epoch composed {by(job.composing_workers)} before it is trained on (--compose first)"
    return f"composed {by(job.num_workers)} alongside the training steps (--compose alongside)"


def run_epochs(job: Job, training: Training, data: Data, stop: StopSignal) -> bool:
    """Train and validate epoch after epoch; whether every epoch ran. Saves last.pt (and best.pt
    when validation improves) at every epoch's end and last.pt when stopped."""
    max_steps = job.options.max_steps
    if training.step >= data.total_steps:  # resumed after the last epoch: its export may not have finished
        job.procs.say(f"all {data.total_steps} steps were trained already: scoring and exporting the final weights")
    while training.step < data.total_steps and not 0 < max_steps <= training.step:
        epoch = training.step // data.steps_per_epoch
        if job.composing_workers is not None and not compose_epoch_first(job, data, epoch, stop):
            save_run_checkpoint("last.pt", job, training)
            job.procs.say(
                f"stopped while composing epoch {epoch + 1}, at step {training.step}; saved "
                f"{job.out_dir / 'last.pt'} (continue with --resume)"
            )
            return False
        stopped = train_one_epoch(job, training, data, epoch, stop)
        if job.procs.world_size > 1:
            align_replicas(*training.replicas)  # what rank 0 validates and writes is what every rank trained
        if stopped:
            save_run_checkpoint("last.pt", job, training)
            job.procs.say(f"stopped at step {training.step}; saved {job.out_dir / 'last.pt'} (continue with --resume)")
            return False
        end_of_epoch(job, training, data, epoch)
        if job.composing_workers is not None:
            drop_composed_epoch(job)
    if training.step < data.total_steps:
        job.procs.say(f"at step {training.step}, which --max-steps {max_steps} does not go past: nothing to train")
    return training.step >= data.total_steps


def end_of_epoch(job: Job, training: Training, data: Data, epoch: int) -> None:
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
        save_run_checkpoint("best.pt", job, training)
    save_run_checkpoint("last.pt", job, training)


def time_left(job: Job, training: Training, data: Data) -> str:
    """How far the run is and, at the pace of this process so far (validation included), when it ends."""
    done, total = training.step, data.total_steps
    seconds = (time.time() - job.started) / max(1, done - job.first_step) * (total - done)
    pace = (done - job.first_step) * job.train_config.batch_size / max(1e-9, time.time() - job.started)
    return (
        f"step {done} of {total} ({done / total:.0%}) at {pace:.0f} img/s: about "
        f"{seconds // 3600:.0f} h {seconds % 3600 / 60:02.0f} min to go, at "
        f"{time.strftime('%H:%M', time.localtime(time.time() + seconds))}"
    )


def calibrate(job: Job, training: Training, data: Data) -> Calibration:
    """The temperature and unsure threshold of the final weights: fitted on validation and on as many
    validation digits composed as training composes them (evaluate.fit_calibration)."""
    val_set, model = data.val_set, training.evaluated.eval()  # eval: BatchNorm reads with its running statistics
    shifted = generate(data.val_composer, len(val_set), seed=job.train_config.seed + 1, progress=False)
    calibration = fit_calibration(
        model,
        val_set.images,
        [r["label"] for r in val_set.records],
        shifted=(np.stack([c.image for c in shifted]), [c.label for c in shifted]),
    )
    job.procs.say(
        f"calibrated on validation and on as many validation digits composed as in training: temperature "
        f"{calibration.temperature:.3f}; readings less sure than {calibration.min_confidence:.3f} are unsure"
    )
    return calibration


def export(job: Job, training: Training, data: Data, *, wall: float, steps: int) -> dict:
    """The final weights (averaged, at the end of the cosine decay) on the test set, written to
    test_metrics.json and model.pt. They are what ships, not best.pt's: on a few thousand
    validation images the last epochs differ by a few images, and picking among them picks noise
    (docs/training.md). A sweep trial ranks settings on validation and skips the test set."""
    procs, out_dir = job.procs, job.out_dir
    if procs.world_size > 1:
        procs.say(
            f"replicas identical: the weights and buffers of all {procs.world_size} ranks agreed at every checkpoint"
        )
    check_finite(training, None, kept=str(out_dir / "last.pt"))
    calibration = calibrate(job, training, data)
    test_metrics = None
    if job.options.run_type != "sweep":
        test_metrics, _ = validate(
            training.evaluated, data.test_set, procs, precision=job.validation_precision, desc="testing"
        )
        job.log.summary.update({f"test/{k}": v for k, v in test_metrics.items()})
    result = {
        "test": test_metrics,
        "train_wall_seconds": wall,
        "train_images_per_second": steps * job.train_config.batch_size / wall,  # this process's steps, if resumed
        "parameters": training.model.num_parameters(),
        "device": str(procs.device),
        "world_size": procs.world_size,
        "precision": "bf16" if job.bf16 else "fp32",
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
        (out_dir / "test_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        save_checkpoint(
            out_dir / "model.pt",
            job.model_config,
            training.evaluated.state_dict(),
            train_config=asdict(job.train_config),
            step=training.step,
            metrics={"test": test_metrics},
            calibration=asdict(calibration),
        )
        if test_metrics is not None:
            print(format_metrics("test", test_metrics))
        print(
            f"wrote {out_dir / 'best.pt'}, {out_dir / 'last.pt'}, {out_dir / 'test_metrics.json'} and "
            f"{out_dir / 'model.pt'} (weights and config only: predict.py --checkpoint, or copy it to "
            "checkpoints/digit_transformer.pt to ship it)"
        )
    return result


# ---- sweeps


def trial_flags(parameters: dict) -> list[str]:
    """{"d_model": 96, "lr": 0.002} -> ["--d-model", "96", "--lr", "0.002"]: a trial's settings
    go through the same parser, and the same checks, as a command line."""
    flags = []
    for name, value in parameters.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def summary_table(rows: list[dict], metric: str) -> str:
    """Markdown table of the trials: number, searched settings, metric, minutes."""
    names = list(SWEEP["parameters"])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| trial | " + " | ".join(names) + f" | {metric} | minutes |", "|---" * (len(names) + 3) + "|"]
    for row in rows:
        score = "failed: " + row["error"] if "error" in row else f"{row[metric]:.4f}"
        lines.append(
            f"| {row['trial']} | "
            + " | ".join(cell(row["parameters"][n]) for n in names)
            + f" | {score} | {row['minutes']:.1f} |"
        )
    return "\n".join(lines)


def sweep(options: argparse.Namespace, argv: list[str], seed: int) -> int:
    """Trials of sweep_config.SWEEP: through wandb's server and agent when logged in, else
    sampled here, each an offline wandb run. Every trial is a normal train() with the trial's
    settings added to this command line; the summary and the best trial's whole settings are
    written to OUT_DIR (default runs/sweep-DATE-TIME)."""
    sweep_dir = Path(options.out_dir or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    metric = SWEEP["metric"]["name"]
    count = options.count or (None if SWEEP["method"] == "grid" else 8)  # None: every combination of the grid
    rows: list[dict] = []

    def run_trial(parameters: dict, run: object = None) -> bool:
        """Train one trial and record its row; False if it was interrupted (Ctrl-C)."""
        number = len(rows) + 1
        print(f"\n== trial {number}: " + " ".join(trial_flags(parameters)), flush=True)
        started = time.time()
        row = {"trial": number, "parameters": parameters}
        trial_dir = sweep_dir / f"trial-{number:02d}"
        try:
            trial_options, model_config, train_config = parse_args(
                [*argv, *trial_flags(parameters), "--out-dir", str(trial_dir)]
            )
            result = train(trial_options, model_config, train_config, run=run)
        except (ValueError, SystemExit) as error:  # settings the data refuses, or the parser (which exits)
            row["error"] = "refused by the argument parser (see above)" if isinstance(error, SystemExit) else str(error)
            if run is not None:
                run.finish(exit_code=1)
        else:
            if not result["finished"]:
                return False
            row[metric], row["settings"] = result["val"][metric], result["settings"]
        rows.append({**row, "minutes": (time.time() - started) / 60})
        return True

    if wandb_mode(options.wandb) == "online":
        import wandb

        def agent_trial() -> None:
            # The agent's run is started here so that the settings it sampled (run.config) are
            # known before the model is built; train() then logs to that run.
            run = wandb.init()
            run_trial(dict(run.config), run=run)

        sweep_id = wandb.sweep(SWEEP, project=options.wandb_project)
        wandb.agent(sweep_id, function=agent_trial, project=options.wandb_project, count=count)
    else:
        print(
            f"sweep offline: {SWEEP['method']} search of sweep_config.py sampled here, every trial to its full budget "
            f"(early termination needs the W&B server); each trial is an offline wandb run (`wandb sync`)"
        )
        for parameters in sample_trials(SWEEP, count, seed=seed):
            if not run_trial(parameters):
                print("sweep interrupted: summarising the finished trials")
                break
    return summarise_sweep(rows, sweep_dir, metric)


def summarise_sweep(rows: list[dict], sweep_dir: Path, metric: str) -> int:
    """Write summary.md, summary.json and the best trial's settings (best_config.json)."""
    table = summary_table(rows, metric)
    (sweep_dir / "summary.md").write_text(table + "\n")
    (sweep_dir / "summary.json").write_text(json.dumps({"metric": metric, "trials": rows}, indent=2) + "\n")
    print("\n" + table)
    scored = [row for row in rows if metric in row]
    if not scored:
        print(f"no trial finished; nothing written to {sweep_dir / 'best_config.json'}", file=sys.stderr)
        return 1
    pick = max if SWEEP["metric"]["goal"] == "maximize" else min
    best = pick(scored, key=lambda row: row[metric])
    full = TrainConfig()  # the full budget, for the command that trains the chosen settings
    # The trial's whole settings, its sweep budget included: --config reproduces the trial; add
    # --epochs and --train-images to train the chosen settings to the full budget.
    (sweep_dir / "best_config.json").write_text(json.dumps(best["settings"], indent=2) + "\n")
    print(
        f"\nbest: trial {best['trial']}, {metric} {best[metric]:.4f}; "
        f"its settings are in {sweep_dir / 'best_config.json'}:\n"
        f"  uv run python train_encoder_decoder.py --config {sweep_dir / 'best_config.json'} "
        f"--epochs {full.epochs} --train-images {full.train_images}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done (or stopped and saved), 2 a usage error (flags, settings, a checkpoint or
    data that cannot be used), 1 failed work (a busy run folder, divergence, a write that failed),
    130 aborted by a second Ctrl-C without saving."""
    argv = sys.argv[1:] if argv is None else argv
    options, model_config, train_config = parse_args(argv)
    try:
        if options.run_type == "sweep":
            return sweep(options, argv, train_config.seed)
        checkpoint = None
        if options.resume:
            model_config, train_config, checkpoint = restore_settings(options)
        train(options, model_config, train_config, checkpoint=checkpoint)
    except (CheckpointError, MnistUnavailableError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RunFolderBusyError, TrainingDivergedError) as error:
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
