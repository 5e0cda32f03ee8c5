import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_MODEL, run_script
from model import ModelConfig
from predict import load_model
from predict import main as predict_main


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
    # model.pt is what gets shipped: the final averaged weights, config and test metrics, no optimiser state.
    export = torch.load(tiny_run / "model.pt", map_location="cpu", weights_only=True)
    assert "optimizer" not in export and export["test_metrics"] == test
    final = torch.load(tiny_run / "last.pt", map_location="cpu", weights_only=True)["ema"]
    assert export["model"].keys() == final.keys() and all(torch.equal(export["model"][k], final[k]) for k in final)
    assert load_model(tiny_run / "model.pt").config == load_model(tiny_run / "best.pt").config


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
                        "--max-steps", "5", "--wandb", "disabled")  # writes to the resumed run's folder
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 5
    for weights in ("model", "ema"):  # the raw weights and their moving average
        for name, tensor in straight[weights].items():
            assert torch.equal(tensor, resumed[weights][name]), (weights, name)
    assert (tmp_path / "resumed" / "best.pt").is_file()  # the epoch that ended after resuming was validated


def test_ctrl_c_saves_last_checkpoint_and_resume_continues(tmp_path, tiny_data_dir, mnist_root):
    process = subprocess.Popen([sys.executable, "train_encoder_decoder.py", *train_args(tiny_data_dir, mnist_root, tmp_path)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "WANDB_SILENT": "true"})
    for line in process.stdout:
        if line.startswith("model:"):  # printed once Ctrl-C is handled, before the first step
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "stopped at step 1" in out and "continue with --resume" in out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 1
    result = run_script("train_encoder_decoder.py", "--resume", str(tmp_path / "last.pt"), "--max-steps", "2")
    assert "at step 1" in result.stdout
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2


def test_a_run_saved_before_newer_flags_resumes(tmp_path, tiny_data_dir, mnist_root):
    # Checkpoints written before --stem-depth, --stem-width, --stem-full-res, --ema-decay,
    # --patch-loss-weight and --length-weights existed have none of them; resuming one must go on
    # as the run it was (no extra convolutions, no averaged weights, no patch head, uniform digit
    # counts) rather than fail or grow new parts.
    old_recipe = ("--stem-depth", "0", "--stem-width", "32", "--stem-full-res", "0", "--length-weights", "1,1,1,1,1",
                  "--ema-decay", "0", "--patch-loss-weight", "0")
    run_script("train_encoder_decoder.py", *train_args(tiny_data_dir, mnist_root, tmp_path, *old_recipe, "--max-steps", "1"))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    for flag in ("stem_depth", "stem_width", "stem_full_res", "ema_decay", "patch_loss_weight", "length_weights"):
        del checkpoint["args"][flag]
    for field in ("stem_depth", "stem_width", "stem_full_res", "patch_head"):
        del checkpoint["config"][field]
    torch.save(checkpoint, tmp_path / "last.pt")
    result = run_script("train_encoder_decoder.py", "--resume", str(tmp_path / "last.pt"), "--max-steps", "2")
    assert "at step 1" in result.stdout
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)
    assert resumed["step"] == 2 and "ema" not in resumed
    assert resumed["config"]["stem_depth"] == 0 and resumed["config"]["stem_width"] == 32 and not resumed["config"]["patch_head"]
    assert resumed["config"]["stem_full_res"] == 0 and resumed["args"]["length_weights"] is None


def test_two_processes_under_torchrun_train_one_model_that_predict_py_loads(tmp_path, tiny_data_dir, mnist_root, composite, capsys):
    # Two CPU processes (gloo), each reading half of every batch of 32, with dropout on so that
    # each rank's own random masks are exercised; the weights must still agree at every
    # checkpoint (the script compares all of them across ranks and fails otherwise).
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train_encoder_decoder.py", *train_args(tiny_data_dir, mnist_root, tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 epochs x 3 steps of 32 (2 processes x 16) on cpu" in result.stdout
    assert "replicas identical: the weights and buffers of all 2 ranks agreed" in result.stdout
    assert result.stdout.count("test: sequence accuracy") == 1  # rank 0 alone reports
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["step"] == 9 and len(last["random_states"]) == 2  # each rank's dropout state, for --resume
    assert not torch.equal(last["random_states"][0][0], last["random_states"][1][0])
    Image.fromarray(composite.image).save(tmp_path / "digits.png")
    assert predict_main(["--checkpoint", str(tmp_path / "model.pt"), "--jsonl", str(tmp_path / "digits.png")]) == 0
    reading = json.loads(capsys.readouterr().out)
    assert reading["path"] == str(tmp_path / "digits.png") and 0 < reading["confidence"] <= 1


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--lr", "-1"), ("--label-smoothing", "1.5"),
                                         ("--ema-decay", "1"), ("--stem-depth", "-1"), ("--stem-width", "3"), ("--stem-full-res", "-1"),
                                         ("--patch-loss-weight", "-1"), ("--length-weights", "1,2"),
                                         ("--length-weights", "1,x,3,4,5"), ("--count", "2"), ("--precision", "fp8")])
def test_absurd_arguments_are_refused(flag, value):
    result = run_script("train_encoder_decoder.py", flag, value, check=False)
    assert result.returncode == 2 and flag.lstrip("-").split("-")[0] in result.stderr
