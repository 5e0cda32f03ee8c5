"""The checkpoint file: what it holds (save_checkpoint's docstring), writing it whole or not at all,
and loading it back as a model after checking everything in it (load_checkpoint, load_model).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from files import Staging
from model import Calibration, DigitSequenceTransformer, ModelConfig
from precision import choose_precision, pick_device

DEFAULT_CHECKPOINT = Path("checkpoints/digit_transformer.pt")  # the shipped model (docs/results.md is its card)
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / DEFAULT_CHECKPOINT  # the default, found from any folder
# Version of the checkpoint layout that save_checkpoint writes (see its docstring); load_checkpoint
# refuses any other, so that a file is never half-understood.
CHECKPOINT_VERSION = 3


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable or not one this code can load."""


def save_checkpoint(path: str | Path, config: ModelConfig, weights: dict, **extra: object) -> None:
    """Write a checkpoint whole or not at all (files.Staging): an interruption, a full disk or a
    second writer never leaves half a file under `path`, and whatever was there stays whole until
    the new file replaces it.

    The layout (CHECKPOINT_VERSION 3), a dict of tensors and plain values only, so that
    torch.load(weights_only=True) reads it without running any pickled code:
        checkpoint_version  3
        model_config        asdict(ModelConfig): the model's shape
        model               state_dict of the weights to read with (the averaged ones, if any)
        calibration         asdict(Calibration), optional: the temperature and the unsure threshold
    and what the training script adds (see train_encoder_decoder.py): train_config, step,
    metrics and, in a run's last.pt / best.pt, training (the optimiser and the rest of the state
    that --resume needs)."""
    state = {"checkpoint_version": CHECKPOINT_VERSION, "model_config": asdict(config), "model": weights, **extra}
    with Staging() as staging, open(staging.file(path), "wb") as file:
        torch.save(state, file)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint at path, its model_config checked (types and bounds) before any model is
    built; CheckpointError, with a one-line reason, for a file that is missing or not ours."""
    path = Path(path)
    if path == DEFAULT_CHECKPOINT and not path.exists():  # run from another folder than the repository's
        path = SHIPPED_CHECKPOINT
    try:
        found = path.is_file()
    except OSError as error:  # a name too long for the file system, say
        raise CheckpointError(f"cannot read the checkpoint {path}: {error.strerror or error}") from error
    if not found:
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
    for job in model.read_bf16:
        model.read_bf16[job] = choose_precision(precision, model, job, probe_threads=False).bf16
    return model
