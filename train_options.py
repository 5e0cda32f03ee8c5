"""The training script's command line: a flag for every field of its config dataclasses (from each
field's type, default, help and bounds), the run options beside them, and the checks that refuse
what no run can take with one line, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import typing
from dataclasses import fields
from pathlib import Path

from files import CommandLine
from mnist import default_mnist_root
from multidigit_generator import parse_weights
from precision import pick_device


def add_settings_flags(parser: argparse.ArgumentParser, config_class: type, title: str, settings: list[str]) -> None:
    """One flag per field of config_class, from its type, default and help. Defaults stay out of
    the parsed arguments (SUPPRESS), so that they hold exactly the settings the user gave."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        if f.name not in settings:
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


def add_group(p: argparse.ArgumentParser, title: str, flags: dict[str, dict]) -> None:
    """A group of flags in --help, each given with its add_argument keywords."""
    group = p.add_argument_group(title)
    for flag, options in flags.items():
        group.add_argument(flag, **options)


SWEEP_OPTIONS = {
    "--count": dict(type=int, help="sweep: number of trials (default: 8; a grid sweep: all its combinations)"),
    "--storage": dict(
        metavar="URL",
        help="offline sweep: the Optuna study's database (default: sqlite in the sweep folder; e.g. "
        "postgresql://host/db, shared by the machines that run the same sweep)",
    ),
    "--workers": dict(type=int, default=1, help="offline sweep: processes taking trials from the study at once"),
    "--no-pruning": dict(
        action="store_true",
        help="offline sweep: run every trial to its whole budget (default: sweep_config's hyperband stops weak trials)",
    ),
}

STARTING_POINT_OPTIONS = {
    "--resume": dict(metavar="CHECKPOINT", help="continue the run saved in this last.pt, with its settings"),
    "--init-from": dict(
        metavar="CHECKPOINT",
        help="start from the weights of this checkpoint (a model.pt or last.pt of the same model settings) "
        "instead of random ones; the optimiser and the learning-rate schedule start afresh",
    ),
    "--distill-from": dict(
        nargs="+",
        default=[],
        metavar="CHECKPOINT",
        help="distil these trained models (an ensemble of one or more, of any size) into the one trained here: "
        "the token loss also matches their averaged probabilities (--distill-weight)",
    ),
}

MACHINE_AND_LOGGING_OPTIONS = {
    "--num-workers": dict(
        type=int,
        help="processes composing training images (default: composing alongside, 1 on a CPU and all of a "
        "process's share of the cores but one on a GPU; composing first, all of its share)",
    ),
    "--compose": dict(
        choices=("auto", "alongside", "first"),
        default="auto",
        help="alongside: worker processes compose the next batches while the model trains; first: every "
        "epoch is composed in memory with every core just before it is trained on; "
        "auto: first on a CPU with one training process (alongside, the composing workers "
        "slow the training threads sharing their cores), alongside otherwise. --composite-cache composes "
        "every epoch first and keeps them",
    ),
    "--composite-cache": dict(
        metavar="DIR",
        help="compose the run's training epochs once, with every core, into DIR (memory-mapped dataset folders "
        "named for the training world and seed), then train from them: the same images as composing while "
        "training, and any later run of the same world and seed reuses them (sweeps; a GPU that composing "
        "would hold back)",
    ),
    "--threads": dict(
        type=int,
        help="PyTorch threads on a CPU (default: PyTorch's count, or fewer where a busy CPU was timed "
        "faster with fewer; a resumed run keeps its count, so that it continues bit for bit)",
    ),
    "--device": dict(
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps ... "
        "(under torchrun, each process takes the GPU of its LOCAL_RANK)",
    ),
    "--precision": dict(
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16: matrix products in bfloat16 under autocast (weights, optimiser and loss stay fp32); "
        "auto: bf16 where a short timing of this model's training step (and of its reading, for validation) "
        "on this machine finds it faster, cached per machine; on a busy CPU also fewer threads where faster "
        "(precision.choose_precision)",
    ),
    "--compile": dict(action="store_true", help="train through torch.compile (a minute or so of compiling first)"),
    "--wandb": dict(
        choices=("auto", "online", "offline", "disabled"),
        help="auto (the default): online when logged in to W&B, offline otherwise; a resumed run keeps its run's",
    ),
    "--offline": dict(dest="wandb", action="store_const", const="offline", help="the same as --wandb offline"),
    "--wandb-project": dict(default="digit-sequence-transformer"),
    "--log-every": dict(type=int, default=25, help="steps between training-loss logs"),
}


def add_run_options(p: argparse.ArgumentParser, recipes: dict[str, dict]) -> None:
    """The flags beside the settings: the run's, a sweep's, its starting point, the machine and logging."""
    full = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipes["full"].items())
    run_options = {
        "--config": dict(
            metavar="FILE",
            help="JSON object of settings, as OUT_DIR/config.json and a sweep's "
            'best_config.json hold ({"lr": 0.002, "d_model": 96, ...}); flags given on the command line win',
        ),
        "--recipe": dict(
            choices=tuple(recipes),
            help=f"quick (the default): the defaults below; full: the recipe meant for the shipped model ({full}); "
            "--config and flags change either",
        ),
        "--run-type": dict(
            choices=("train", "sweep"),
            default="train",
            help="sweep: trials with settings from sweep_config.py (through W&B's server with a login, else an "
            "Optuna study in the sweep folder), a summary, pictures and the best settings in best_config.json",
        ),
        "--out-dir": dict(
            help="last.pt, best.pt, config.json, test_metrics.json and model.pt go here "
            "(default: runs/default, or the folder of the checkpoint given to --resume)",
        ),
        "--max-steps": dict(
            type=int,
            default=0,
            help="stop (and save last.pt) after this many steps, the schedule unchanged; 0: run all epochs",
        ),
        "--save-every": dict(
            type=int,
            default=0,
            metavar="STEPS",
            help="also save last.pt every STEPS steps, so that a crash loses at most that many (default 0: at each "
            "epoch's end only)",
        ),
        "--data-dir": dict(
            help="holds splits.json, val/ and test/; made on first use (default: data, or the resumed run's)"
        ),
        "--mnist-root": dict(
            default=default_mnist_root(), help="folder with MNIST/raw/ (default: $MNIST_ROOT or data)"
        ),
    }
    add_group(p, "run options", run_options)
    add_group(p, "sweep options (--run-type sweep)", SWEEP_OPTIONS)
    add_group(p, "where a run starts (default: random weights)", STARTING_POINT_OPTIONS)
    add_group(p, "machine and logging options", MACHINE_AND_LOGGING_OPTIONS)


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


def flag_names(message: str, settings: list[str]) -> str:
    """A settings error as the command line spells it: d_model -> --d-model."""
    return re.sub(r"\b(" + "|".join(settings) + r")\b", lambda m: "--" + m[1].replace("_", "-"), message)


def read_config_file(path: str, settings: list[str]) -> dict:
    """The settings in a --config file; ValueError saying what is wrong with it."""
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--config {path}: {error}") from None
    if not isinstance(given, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings, got {type(given).__name__}")
    if unknown := sorted(set(given) - set(settings)):
        raise ValueError(f"--config {path}: not settings: {', '.join(unknown)}")
    return given


def check_run_options(parser: CommandLine, options: argparse.Namespace) -> None:
    """Exit with a usage error for run options no run can take."""
    bounds = {"max_steps": (0, 10**9), "num_workers": (0, 64), "log_every": (1, 10**9), "save_every": (0, 10**9)}
    for name, (least, most) in {**bounds, "threads": (1, 1024)}.items():
        value = getattr(options, name)
        if value is not None and not least <= value <= most:
            parser.error(f"--{name.replace('_', '-')} must be {least} to {most:,}, got {value}")
    sweeping = options.storage or options.workers != 1 or options.no_pruning
    if sweeping and options.run_type != "sweep":
        parser.error("--storage, --workers and --no-pruning are sweep options: add --run-type sweep")
    if not 1 <= options.workers <= 64:
        parser.error(f"--workers must be 1 to 64, got {options.workers}")
    if options.count is not None and (options.count < 1 or options.run_type != "sweep"):
        parser.error(f"--count is the number of sweep trials: at least 1, with --run-type sweep (got {options.count})")
    parser.checked("--device", pick_device, options.device)
    if options.out_dir and Path(options.out_dir).exists() and not Path(options.out_dir).is_dir():
        parser.error(f"--out-dir {options.out_dir} is a file: a run writes a folder; give another path")
    if options.composite_cache is not None and (problem := cache_folder_problem(options.composite_cache)):
        parser.error(problem)
    if options.composite_cache is not None and options.compose == "alongside":
        parser.error("--composite-cache composes every epoch before training: it does not go with --compose alongside")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and options.run_type == "sweep":
        parser.error("a sweep runs its trials one after another in one process: start it without torchrun")
