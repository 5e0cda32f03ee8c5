import json

import pytest
import torch

from conftest import TINY_MODEL, run_script
from model import ModelConfig
from predict import load_model


def test_training_writes_loadable_checkpoints_metrics_and_wandb_logs(tiny_run):
    for name in ("best.pt", "last.pt"):
        checkpoint = torch.load(tiny_run / name, map_location="cpu", weights_only=True)
        assert ModelConfig(**checkpoint["config"]).d_model == 32  # config travels with the weights
        assert {"model", "optimizer", "step", "rng_state", "args"} <= set(checkpoint)
    assert torch.load(tiny_run / "last.pt", weights_only=True)["step"] == 8
    metrics = json.loads((tiny_run / "test_metrics.json").read_text())
    test = metrics["test"]
    assert 0.0 <= test["sequence_accuracy"] <= 1.0
    assert {"sequence_accuracy_len0", "sequence_accuracy_len4", "sequence_accuracy_row", "sequence_accuracy_scatter"} <= set(test)
    assert metrics["train_images_per_second"] > 0
    # wandb ran offline and recorded the run locally, ready for `wandb sync`.
    assert list((tiny_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert load_model(tiny_run / "best.pt").config.max_digits == 4


def train_args(data_dir, mnist_root, out_dir, *extra):
    return ("--data-dir", str(data_dir), "--mnist-root", str(mnist_root), "--out-dir", str(out_dir),
            "--epochs", "3", "--train-images", "96", "--batch-size", "32", "--num-workers", "0",
            "--wandb", "disabled", "--dropout", "0.1", *TINY_MODEL, *extra)


def test_interrupted_training_resumes_exactly(tmp_path, tiny_data_dir, mnist_root):
    # Straight through 5 steps, versus 2 steps, stop, resume to 5 (across an epoch end, with
    # dropout on so the random state matters): the weights must be identical.
    run_script("train_encoder_decoder.py", *train_args(tiny_data_dir, mnist_root, tmp_path / "straight", "--max-steps", "5"))
    run_script("train_encoder_decoder.py", *train_args(tiny_data_dir, mnist_root, tmp_path / "resumed", "--max-steps", "2"))
    result = run_script("train_encoder_decoder.py", "--resume", str(tmp_path / "resumed" / "last.pt"),
                        "--max-steps", "5", "--out-dir", str(tmp_path / "resumed"), "--wandb", "disabled")
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 5
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert (tmp_path / "resumed" / "best.pt").is_file()  # the epoch that ended after resuming was validated


def test_sweep_run_type_explains_itself():
    result = run_script("train_encoder_decoder.py", "--run-type", "sweep", check=False)
    assert result.returncode == 2 and "not available yet" in result.stderr


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--lr", "-1"), ("--label-smoothing", "1.5")])
def test_absurd_arguments_are_refused(flag, value):
    result = run_script("train_encoder_decoder.py", flag, value, check=False)
    assert result.returncode == 2 and flag.lstrip("-").split("-")[0] in result.stderr
