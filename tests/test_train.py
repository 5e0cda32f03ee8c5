import contextlib
import copy
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import typing
from dataclasses import fields

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from checkpoint import load_checkpoint, load_model
from conftest import REPO, TINY_MODEL
from model import ModelConfig
from predict import main as predict_main
from split_multidigit_dataset import prepare_splits
from train_encoder_decoder import RECIPES, SETTINGS, TrainConfig, all_settings, make_configs, parse_args
from train_encoder_decoder import main as train_main


def test_training_writes_loadable_checkpoints_metrics_and_wandb_logs(tiny_run):
    settings = json.loads((tiny_run / "config.json").read_text())  # every setting of the run, as --config reads them
    assert settings["d_model"] == 32 and settings["epochs"] == 2 and settings["lr"] == TrainConfig().lr
    for name in ("best.pt", "last.pt"):
        checkpoint = load_checkpoint(tiny_run / name)
        assert checkpoint["model_config"].d_model == 32  # config travels with the weights
        assert checkpoint["train_config"] == {k: settings[k] for k in checkpoint["train_config"]}
        assert {"weights", "optimizer", "random_states", "best_score"} <= set(checkpoint["training"])
    assert load_checkpoint(tiny_run / "last.pt")["step"] == 8
    metrics = json.loads((tiny_run / "test_metrics.json").read_text())
    # Written last: a folder holding test_metrics.json holds a finished run, model.pt included.
    assert (tiny_run / "model.pt").stat().st_mtime_ns <= (tiny_run / "test_metrics.json").stat().st_mtime_ns
    test = metrics["test"]
    # The script's accuracies agree with its own counts: 48 test images, so multiples of 1/48.
    assert test["sequence_accuracy"] == pytest.approx(round(test["sequence_accuracy"] * 48) / 48)
    assert test["sequence_accuracy"] <= test["order_free_accuracy"] and test["sequence_accuracy_len0"] >= 0
    assert {
        "sequence_accuracy_len0",
        "sequence_accuracy_len4",
        "sequence_accuracy_row",
        "sequence_accuracy_scatter",
    } <= set(test)
    assert metrics["train_images_per_second"] > 0 and metrics["settings"] == settings
    # wandb ran offline and recorded the run locally, ready for `wandb sync`.
    assert list((tiny_run / "wandb").glob("offline-run-*/run-*.wandb"))
    # model.pt is what gets shipped: the final averaged weights, configs and test metrics, no optimiser state.
    export, last = load_checkpoint(tiny_run / "model.pt"), load_checkpoint(tiny_run / "last.pt")
    assert "training" not in export and export["metrics"]["test"] == test
    assert all(torch.equal(export["model"][k], last["model"][k]) for k in last["model"])
    assert not all(
        torch.equal(last["model"][k], last["training"]["weights"][k]) for k in last["model"]
    )  # averaged, not raw
    assert load_model(tiny_run / "model.pt").config == load_model(tiny_run / "best.pt").config


def train_args(data_dir, mnist_root, out_dir, *extra):
    return [
        "--data-dir",
        str(data_dir),
        "--mnist-root",
        str(mnist_root),
        "--out-dir",
        str(out_dir),
        "--epochs",
        "3",
        "--train-images",
        "96",
        "--batch-size",
        "32",
        "--num-workers",
        "0",
        "--wandb",
        "disabled",
        "--dropout",
        "0.1",
        *TINY_MODEL,
        *extra,
    ]


def test_interrupted_training_resumes_exactly_and_the_composite_cache_trains_the_same(
    tmp_path, tiny_data_dir, mnist_root, capsys
):
    # Straight through 5 steps composing alongside, versus each epoch composed first, versus 2
    # steps from --composite-cache, stop, resume to 5 (across an epoch end, with dropout on so the
    # random state matters): the weights must be identical. In this process: the command line's
    # code path without a Python start-up per run. One thread for all (a busy machine could have
    # them timed to different counts, which round differently); the resumed run keeps its count,
    # its W&B mode and its cache without being told.
    cache = tmp_path / "composites"
    runs = (
        ("straight", "5", ("--compose", "alongside")),
        ("first", "5", ("--compose", "first")),
        ("resumed", "2", ("--composite-cache", str(cache))),
    )
    for name, steps, extra in runs:
        args = train_args(tiny_data_dir, mnist_root, tmp_path / name, "--max-steps", steps, "--threads", "1", *extra)
        assert train_main(args) == 0
    assert "training epochs 1-1 from" in capsys.readouterr().out  # only as far as --max-steps 2 goes
    (folder,) = cache.iterdir()
    written = (folder / "epoch-001" / "images.npy").stat().st_mtime_ns
    torch.set_num_threads(2)
    # A copy of the stopped run, resumed, goes on in the copy's folder; the original stays as it was.
    shutil.copytree(tmp_path / "resumed", tmp_path / "copy")
    before = (tmp_path / "resumed" / "last.pt").read_bytes()
    assert train_main(["--resume", str(tmp_path / "copy" / "last.pt"), "--max-steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and torch.get_num_threads() == 1
    assert "training epochs 1-2 from" in out and "composing 1 of them" in out  # epoch 1 read as it was
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["epoch-001", "epoch-002"]
    assert (folder / "epoch-001" / "images.npy").stat().st_mtime_ns == written
    assert (tmp_path / "resumed" / "last.pt").read_bytes() == before
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    for other in ("first", "copy"):
        resumed = torch.load(tmp_path / other / "last.pt", weights_only=True)
        assert straight["step"] == resumed["step"] == 5 and resumed["training"]["wandb"] == "disabled"
        for name, tensor in straight["training"]["weights"].items():  # the raw weights
            assert torch.equal(tensor, resumed["training"]["weights"][name]), name
        for name, tensor in straight["model"].items():  # their moving average
            assert torch.equal(tensor, resumed["model"][name]), name
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == sorted(
        p.name for p in (tmp_path / "straight").iterdir()
    )  # composing first holds its epoch in memory and leaves nothing of it on disk
    assert (tmp_path / "copy" / "best.pt").is_file()  # the epoch that ended after resuming was validated
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exited:
        train_main([*train_args(tiny_data_dir, mnist_root, tmp_path), "--composite-cache", str(tmp_path / "a-file/x")])
    assert exited.value.code == 2 and "a-file is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # a cache composes every epoch first: never alongside
        train_main(
            [
                *train_args(tiny_data_dir, mnist_root, tmp_path),
                "--composite-cache",
                str(cache),
                "--compose",
                "alongside",
            ]
        )
    assert exited.value.code == 2 and "does not go with --compose alongside" in capsys.readouterr().err


def test_a_new_run_into_a_used_folder_is_refused_and_leaves_the_first_run_whole(
    tmp_path, tiny_data_dir, mnist_root, capsys
):
    folder = tmp_path / "run"
    assert train_main(train_args(tiny_data_dir, mnist_root, folder, "--max-steps", "1")) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert train_main(train_args(tiny_data_dir, mnist_root, folder, "--max-steps", "1", "--lr", "0.003")) == 2
    err = capsys.readouterr().err
    assert f"{folder} holds another run (last.pt" in err
    assert f"continue it with --resume {folder / 'last.pt'}, or give this run another --out-dir" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_a_start_that_failed_leaves_the_folder_free_for_the_next_run(tmp_path, tiny_data_dir, mnist_root, capsys):
    folder = tmp_path / "run"
    (tmp_path / "a-file").write_text("")
    for refused in (["--data-dir", str(tmp_path / "a-file" / "data")], ["--device", "meta"]):
        with contextlib.suppress(SystemExit):
            assert train_main([*train_args(tiny_data_dir, mnist_root, folder, "--max-steps", "1"), *refused]) == 2
        assert "error:" in capsys.readouterr().err
        assert not [p for p in folder.glob("*") if p.name != ".lock"]  # no config.json of a run that never ran
    assert train_main(train_args(tiny_data_dir, mnist_root, folder, "--max-steps", "1")) == 0
    assert json.loads((folder / "config.json").read_text())["train_images"] and (folder / "last.pt").is_file()


def test_a_data_folder_composed_for_another_model_is_refused_before_training(
    tmp_path, tiny_data_dir, mnist_root, capsys
):
    # tiny_data_dir holds 96x96 images of up to 4 digits: a model that reads 3 cannot be scored on them.
    assert train_main(train_args(tiny_data_dir, mnist_root, tmp_path / "run", "--max-digits", "3")) == 2
    err = capsys.readouterr().err
    assert "images of up to 4 digits; this model reads 96x96 images of up to 3" in err and "--data-dir" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_resume_goes_on_with_the_data_split_it_trained_on_or_not_at_all(tmp_path, tiny_data_dir, mnist_root, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    assert train_main(train_args(data, mnist_root, tmp_path / "run", "--max-steps", "1")) == 0
    last = tmp_path / "run" / "last.pt"
    before = last.read_bytes()
    resume = ["--resume", str(last), "--max-steps", "2", "--wandb", "disabled"]
    split = (data / "splits.json").read_text()
    (data / "splits.json").unlink()  # the data folder is gone: no new split is made in its place
    assert train_main(resume) == 2
    assert "splits.json is gone, and the run being resumed trained on the split it held" in capsys.readouterr().err
    assert not (data / "splits.json").exists() and last.read_bytes() == before
    (data / "splits.json").write_text(split.replace('"seed": ', '"seed": 1'))  # split again, by hand
    assert train_main(resume) == 2
    assert "is not the split the run being resumed trained on" in capsys.readouterr().err
    (data / "splits.json").write_text(split)
    assert train_main(resume) == 0 and torch.load(last, weights_only=True)["step"] == 2
    # A val/ of another split beside this splits.json would hold digits the run trains on.
    prepare_splits(tmp_path / "other", mnist_root=mnist_root, val_images=48, test_images=48, seed=1)
    shutil.rmtree(data / "val")
    shutil.copytree(tmp_path / "other" / "val", data / "val")
    assert train_main([*resume[:3], "3", *resume[4:]]) == 2
    assert f"{data / 'val'} is not the set {data / 'splits.json'} was written with" in capsys.readouterr().err
    assert torch.load(last, weights_only=True)["step"] == 2


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, and a cluster's preemption notice
def test_ctrl_c_saves_last_checkpoint_and_resume_continues(tmp_path, tiny_data_dir, mnist_root, capsys, stop):
    # Composing alongside, so that the first thing Ctrl-C can stop is a training step.
    args = train_args(tiny_data_dir, mnist_root, tmp_path, "--compose", "alongside")
    process = subprocess.Popen(
        [sys.executable, "train_encoder_decoder.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_SILENT": "true"},
    )
    watchdog = threading.Timer(300, process.kill)  # a run that hangs ends its output, and the test fails
    watchdog.start()
    for line in process.stdout:
        if line.startswith("model:"):  # printed once Ctrl-C is handled, before the first step
            process.send_signal(stop)
            break
    out, err = process.communicate(timeout=300)
    watchdog.cancel()
    assert process.returncode == 0, err
    assert "stopped at step 1" in out and "continue with --resume" in out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 1
    assert train_main(["--resume", str(tmp_path / "last.pt"), "--max-steps", "2", "--wandb", "disabled"]) == 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
    # A run already at or past --max-steps trains no further (and exports nothing).
    assert train_main(["--resume", str(tmp_path / "last.pt"), "--max-steps", "1", "--wandb", "disabled"]) == 0
    assert "stopped at step 2 by --max-steps 1" in capsys.readouterr().out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2


def test_ctrl_c_while_an_epoch_is_composed_first_stops_there_and_resume_composes_it(
    tmp_path, tiny_data_dir, mnist_root, monkeypatch, capsys
):
    import datasets

    compose = datasets.FreshComposites.composites

    def interrupted(self, indices):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first batch of the epoch is composed
        return compose(self, indices)

    monkeypatch.setattr(datasets.FreshComposites, "composites", interrupted)
    assert train_main(train_args(tiny_data_dir, mnist_root, tmp_path, "--compose", "first")) == 0
    out = capsys.readouterr().out
    assert "stopped while composing epoch 1, at step 0" in out and "continue with --resume" in out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 0
    monkeypatch.undo()
    assert train_main(["--resume", str(tmp_path / "last.pt"), "--max-steps", "4", "--wandb", "disabled"]) == 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 4


def test_resume_refuses_new_settings_and_files_it_cannot_continue(tmp_path, tiny_run, capsys):
    with pytest.raises(SystemExit) as exited:
        train_main(["--resume", str(tiny_run / "last.pt"), "--lr", "0.1", "--d-model", "64"])
    assert exited.value.code == 2 and "drop --lr, --d-model" in capsys.readouterr().err
    assert train_main(["--resume", str(tiny_run / "model.pt")]) == 2
    assert "resume from a run's last.pt" in capsys.readouterr().err
    old = torch.load(tiny_run / "last.pt", weights_only=True)
    torch.save(
        {"config": old["model_config"], "model": old["model"], "step": 1}, tmp_path / "old.pt"
    )  # an older layout
    assert train_main(["--resume", str(tmp_path / "old.pt"), "--data-dir", str(tmp_path / "data")]) == 2
    assert "is not a digit-sequence checkpoint of version 3" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before any data was made


def test_bf16_autocast_trains_and_evaluates_when_asked_for(tmp_path, tiny_data_dir, mnist_root, capsys):
    # Forced, so that the bf16 path runs on every machine, whatever `auto` would pick here.
    assert (
        train_main(
            train_args(
                tiny_data_dir, mnist_root, tmp_path, "--precision", "bf16", "--epochs", "1", "--train-images", "64"
            )
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "bf16 autocast" in out and "test: sequence accuracy" in out
    assert "precision: training bf16, as asked" in out and "validation bf16, as asked" in out
    assert re.search(r"step 2 of 2 \(100%\) at \d+ img/s: about 0 h 00 min to go", out)  # the ETA, at each epoch's end
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert all(
        t.dtype != torch.bfloat16 and torch.isfinite(t).all()
        for t in checkpoint["model"].values()
        if t.is_floating_point()
    )


def test_two_processes_under_torchrun_train_one_model_that_predict_py_loads(
    tmp_path, tiny_data_dir, mnist_root, composite, capsys
):
    # Two CPU processes (gloo), each reading half of every batch of 32, with dropout on so that
    # each rank's own random masks are exercised; the weights must still agree at every
    # checkpoint (the script compares all of them across ranks and fails otherwise).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train_encoder_decoder.py",
            *train_args(tiny_data_dir, mnist_root, tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 epochs x 3 steps of 32 (2 processes x 16) on cpu" in result.stdout
    assert "replicas identical: the weights and buffers of all 2 ranks agreed" in result.stdout
    assert result.stdout.count("test: sequence accuracy") == 1  # rank 0 alone reports
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    random_states = last["training"]["random_states"]
    assert last["step"] == 9 and len(random_states) == 2  # each rank's dropout state, for --resume
    assert not torch.equal(random_states[0][0], random_states[1][0])
    Image.fromarray(composite.image).save(tmp_path / "digits.png")
    assert predict_main(["--checkpoint", str(tmp_path / "model.pt"), "--jsonl", str(tmp_path / "digits.png")]) == 0
    reading = json.loads(capsys.readouterr().out)
    assert reading["path"] == str(tmp_path / "digits.png") and 0 < reading["confidence"] <= 1


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--batch-size", "0", "--batch-size must be between 1 and"),
        ("--lr", "-1", "--lr must be between"),
        ("--label-smoothing", "1.5", "--label-smoothing must be between 0.0 and 0.99"),
        ("--ema-decay", "1", "--ema-decay must be"),
        ("--stem-depth", "-1", "--stem-depth must be between 0 and 8"),
        ("--stem-width", "3", "--stem-width must be an even"),
        ("--stem-full-res", "-1", "--stem-full-res must be between"),
        ("--patch-loss-weight", "-1", "--patch-loss-weight must be"),
        ("--length-weights", "1,2", "--length-weights must be 5 non-negative numbers"),
        ("--length-weights", "1,x,3,4,5", "expected comma-separated numbers"),
        ("--length-weights", "nan,1,1,1,1", "--length-weights must hold finite numbers"),
        ("--augment-strength", "nan", "--augment-strength must hold finite numbers"),
        ("--augment-strength", "1e6", "--augment-strength must be between 0.0 and 5.0"),
        ("--d-model", "30", "--d-model 30 is not divisible by --n-heads 4"),
        ("--max-digits", "40", "--max-digits must be between"),
        ("--count", "2", "--count is the number of sweep trials"),
        ("--precision", "fp8", "invalid choice: 'fp8'"),
    ],
)
def test_absurd_arguments_are_refused_naming_the_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exited:
        train_main([flag, value])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_a_second_run_into_a_busy_folder_stops_naming_the_first_and_a_stale_lock_is_no_obstacle(
    tmp_path, tiny_data_dir, mnist_root, capsys
):
    from runs import Processes, run_lock

    folder = tmp_path / "run"
    with run_lock(folder, Processes(torch.device("cpu"))):  # a run that is still going
        assert train_main(train_args(tiny_data_dir, mnist_root, folder, "--max-steps", "1")) == 1
        err = capsys.readouterr().err
        assert f"{folder} is in use by another training run (pid {os.getpid()} on " in err
        assert not (folder / "last.pt").exists() and not (folder / "config.json").exists()
    # The holder is gone (as after a crash: its .lock file is still there, but no lock on it).
    assert (folder / ".lock").is_file()
    assert train_main(train_args(tiny_data_dir, mnist_root, folder, "--max-steps", "1")) == 0
    assert load_checkpoint(folder / "last.pt")["step"] == 1


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_data_dir, mnist_root, monkeypatch, capsys
):
    import train_encoder_decoder as training

    real_step = training.training_step

    def poisoned_step(job, state, data, batch):  # as an exploding learning rate would leave the weights
        result = real_step(job, state, data, batch)
        if state.step == 5:
            next(state.model.parameters()).data.fill_(float("nan"))
        return result

    monkeypatch.setattr(training, "training_step", poisoned_step)
    assert train_main(train_args(tiny_data_dir, mnist_root, tmp_path, "--log-every", "1")) == 1
    err = capsys.readouterr().err
    assert "training diverged: the weights became NaN or infinite by step 5" in err and "--lr" in err
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 3 and load_model(tmp_path / "last.pt")  # the end of epoch 1, whole and finite
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "test_metrics.json").exists()


def test_save_every_bounds_what_a_crash_can_lose(tmp_path, tiny_data_dir, mnist_root, monkeypatch):
    import runs

    saved = []
    real_save = runs.save_checkpoint
    monkeypatch.setattr(
        runs,
        "save_checkpoint",
        lambda path, *a, **k: (saved.append((path.name, k["step"])), real_save(path, *a, **k)),
    )
    assert train_main(train_args(tiny_data_dir, mnist_root, tmp_path, "--save-every", "2")) == 0
    last_steps = [step for name, step in saved if name == "last.pt"]
    assert last_steps == [2, 3, 4, 6, 6, 8, 9]  # every 2 steps, and every epoch's end (3 steps)


def test_write_faults_are_one_line_and_leave_saved_files_whole(
    tmp_path, tiny_data_dir, mnist_root, monkeypatch, capsys
):
    import model

    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as exited:
        train_main(train_args(tiny_data_dir, mnist_root, tmp_path / "a_file"))
    assert exited.value.code == 2 and "--out-dir " + str(tmp_path / "a_file") + " is a file" in capsys.readouterr().err
    assert train_main(train_args(tiny_data_dir, mnist_root, tmp_path / "run", "--max-steps", "1")) == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()

    def full_disk(state, file):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model.torch, "save", full_disk)
    assert train_main(["--resume", str(tmp_path / "run" / "last.pt"), "--max-steps", "2", "--wandb", "disabled"]) == 1
    err = capsys.readouterr().err
    assert "error: No space left on device" in err and "files already saved are intact" in err
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "config.json", "last.pt"]


def test_a_second_ctrl_c_aborts_without_a_traceback(tmp_path, tiny_data_dir, mnist_root, monkeypatch, capsys):
    import train_encoder_decoder as training

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "training_step", interrupted)
    assert train_main(train_args(tiny_data_dir, mnist_root, tmp_path)) == 130
    assert "aborted without saving" in capsys.readouterr().err and not (tmp_path / "last.pt").exists()


NUMERIC_SETTINGS = [
    (name, kind)
    for config in (ModelConfig, TrainConfig)
    for name, kind in typing.get_type_hints(config).items()
    if kind in (int, float) and name in SETTINGS
]


@settings(max_examples=120, deadline=None)
@given(
    setting=st.sampled_from(NUMERIC_SETTINGS),
    value=st.one_of(
        st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)
    ),
)
def test_any_value_of_a_numeric_flag_is_taken_within_bounds_or_refused_naming_the_flag(setting, value):
    name, kind = setting
    flag = "--" + name.replace("_", "-")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            _, model_config, train_config = parse_args([flag, str(value)])
    except SystemExit as exited:
        assert exited.code == 2
        message = err.getvalue().strip().splitlines()[-1]
        assert ": error: " in message and flag in message, message
    else:
        taken = all_settings(model_config, train_config)[name]
        field = next(f for config in (ModelConfig, TrainConfig) for f in fields(config) if f.name == name)
        assert isinstance(taken, kind) and math.isfinite(taken)
        assert field.metadata["low"] <= taken <= field.metadata["high"]


def test_model_card_the_full_recipe_is_the_shipped_model():
    # `--recipe full` trains the shipped model: ModelConfig's defaults and the full recipe's settings
    # are those checkpoints/digit_transformer.pt was trained with.
    from dataclasses import asdict

    from checkpoint import DEFAULT_CHECKPOINT

    shipped = load_checkpoint(DEFAULT_CHECKPOINT)
    model_config, train_config = make_configs(RECIPES["full"])
    assert shipped["model_config"] == ModelConfig() == model_config
    assert shipped["train_config"] == asdict(train_config)


def test_resuming_a_finished_run_says_so_and_exports_its_final_weights_again(
    tmp_path, tiny_data_dir, mnist_root, capsys
):
    # A run whose export did not finish (a crash while testing) is completed by --resume.
    assert train_main(train_args(tiny_data_dir, mnist_root, tmp_path, "--epochs", "1", "--train-images", "32")) == 0
    exported, metrics = load_checkpoint(tmp_path / "model.pt"), json.loads((tmp_path / "test_metrics.json").read_text())
    finished = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert train_main(["--resume", str(tmp_path / "last.pt"), "--wandb", "disabled"]) == 0
    assert "holds a finished run (model.pt, test_metrics.json): nothing to resume" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"} == finished
    (tmp_path / "model.pt").unlink()
    (tmp_path / "test_metrics.json").unlink()
    assert train_main(["--resume", str(tmp_path / "last.pt"), "--wandb", "disabled"]) == 0
    out = capsys.readouterr().out
    assert "all 1 steps were trained already: scoring and exporting the final weights" in out
    again = load_checkpoint(tmp_path / "model.pt")
    assert "test: sequence accuracy" in out and again["step"] == 1
    # The same model as the first export: reading to calibrate must not move BatchNorm's statistics.
    assert again["calibration"] == exported["calibration"]
    assert all(torch.equal(t, again["model"][k]) for k, t in exported["model"].items())
    # Its training time includes the first process's (which last.pt records), not only the
    # exporting one's, which trained nothing: no more 0 images a second.
    redone = json.loads((tmp_path / "test_metrics.json").read_text())
    trained = torch.load(tmp_path / "last.pt", weights_only=True)["training"]["train_seconds"]
    assert redone["train_wall_seconds"] >= trained > 0 and metrics["train_wall_seconds"] >= trained
    assert redone["train_images_per_second"] == pytest.approx(1 * 32 / redone["train_wall_seconds"])


def test_max_steps_at_an_epochs_end_validates_it_and_resuming_picks_the_same_best(
    tmp_path, tiny_data_dir, mnist_root, capsys
):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train_main(train_args(tiny_data_dir, mnist_root, straight, "--epochs", "2")) == 0
    assert train_main(train_args(tiny_data_dir, mnist_root, stopped, "--epochs", "2", "--max-steps", "3")) == 0
    assert "stopped at step 3 by --max-steps 3" in capsys.readouterr().out  # 3 steps of 32 make epoch 1
    assert load_checkpoint(stopped / "best.pt")["step"] == 3  # epoch 1 was validated
    assert train_main(["--resume", str(stopped / "last.pt")]) == 0
    assert load_checkpoint(stopped / "best.pt")["step"] == load_checkpoint(straight / "best.pt")["step"]
    assert torch.equal(
        load_checkpoint(stopped / "model.pt")["model"]["head.weight"],
        load_checkpoint(straight / "model.pt")["model"]["head.weight"],
    )


def test_distill_from_teaches_with_trained_models_through_a_resume_and_refuses_what_cannot_teach(
    tmp_path, tiny_run, tiny_data_dir, mnist_root, capsys
):
    teacher = str(tmp_path / "teacher.pt")
    shutil.copyfile(tiny_run / "model.pt", teacher)
    args = train_args(tiny_data_dir, mnist_root, tmp_path / "student", "--distill-from", teacher, teacher)
    assert train_main([*args, "--max-steps", "1"]) == 0
    assert "distilling" in capsys.readouterr().out
    assert train_main(["--resume", str(tmp_path / "student" / "last.pt"), "--max-steps", "2"]) == 0
    resumed = load_checkpoint(tmp_path / "student" / "last.pt")
    assert resumed["step"] == 2 and resumed["training"]["distill_from"] == [teacher, teacher]
    assert "distilling" in capsys.readouterr().out
    # The teacher's file replaced by another model: the run would go on learning from someone else.
    shutil.copyfile(tiny_run / "best.pt", teacher)
    assert train_main(["--resume", str(tmp_path / "student" / "last.pt"), "--max-steps", "3"]) == 2
    assert f"--distill-from {teacher} is not the file the run was distilled from" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "student" / "last.pt")["step"] == 2
    shutil.copyfile(tiny_run / "model.pt", teacher)
    missing = str(tmp_path / "none.pt")
    for extra, message in (
        (["--distill-from", missing], f"--distill-from {missing}: no such file"),
        (["--distill-from", str(tiny_data_dir / "splits.json")], "--distill-from"),
        (["--distill-from", teacher, "--max-digits", "3"], "up to 4 digits, this model 96px and 3"),
        (["--distill-from", teacher, "--order-free"], "does not go with --order-free"),
    ):
        with pytest.raises(SystemExit) as exited:
            train_main([*train_args(tiny_data_dir, mnist_root, tmp_path / "refused"), *extra])
        assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit) as exited:
        train_main(["--resume", str(tmp_path / "student" / "last.pt"), "--distill-from", teacher])
    assert exited.value.code == 2 and "drop --distill-from" in capsys.readouterr().err


def test_init_from_starts_a_new_run_from_trained_weights_and_refuses_another_shape(
    tmp_path, tiny_run, tiny_data_dir, mnist_root, capsys
):
    # A learning rate too small to move anything: the new run's weights are the checkpoint's.
    args = train_args(tiny_data_dir, mnist_root, tmp_path / "tuned", "--init-from", str(tiny_run / "model.pt"))
    assert train_main([*args, "--max-steps", "1", "--lr", "1e-8", "--dropout", "0"]) == 0
    started, trained = load_checkpoint(tmp_path / "tuned" / "last.pt"), load_checkpoint(tiny_run / "model.pt")
    assert started["step"] == 1 and "starting from the weights of" in capsys.readouterr().out
    # Resumed, the run still knows where it started (test_metrics.json says it from there).
    assert train_main(["--resume", str(tmp_path / "tuned" / "last.pt"), "--max-steps", "2", "--wandb", "disabled"]) == 0
    resumed = load_checkpoint(tmp_path / "tuned" / "last.pt")
    assert resumed["step"] == 2 and resumed["training"]["init_from"] == str(tiny_run / "model.pt")
    learned = [
        k for k in trained["model"] if "running_" not in k and "num_batches" not in k
    ]  # BatchNorm's statistics move
    assert all(torch.allclose(started["training"]["weights"][k], trained["model"][k]) for k in learned)
    capsys.readouterr()
    other_shape = [*train_args(tiny_data_dir, mnist_root, tmp_path / "wide"), "--d-model", "64"]
    for init_from, message in (
        (tiny_run / "model.pt", "its model differs from this run's in d_model"),
        (tmp_path / "none.pt", "no such file"),
        (tmp_path / ("9" * 300 + ".pt"), "File name too long"),  # more than a file name may hold
    ):
        with pytest.raises(SystemExit) as exited:
            train_main([*other_shape, "--init-from", str(init_from)])
        assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "wide").exists()  # refused before anything was written
    with pytest.raises(SystemExit) as exited:
        train_main(["--resume", str(tiny_run / "last.pt"), "--init-from", str(tiny_run / "model.pt")])
    assert exited.value.code == 2 and "drop --init-from" in capsys.readouterr().err


def test_the_full_recipe_changes_its_settings_and_config_files_and_flags_change_it(tmp_path, capsys):
    _, _, quick = parse_args([])
    _, _, full = parse_args(["--recipe", "full"])
    assert quick == TrainConfig()
    assert {k: getattr(full, k) for k in RECIPES["full"]} == RECIPES["full"] != {}
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 7}))
    _, _, mixed = parse_args(["--recipe", "full", "--config", str(tmp_path / "c.json"), "--lr", "0.002"])
    assert mixed.epochs == 7 and mixed.lr == 0.002  # the file over the recipe, the flag over both
    with pytest.raises(SystemExit) as exited:
        parse_args(["--resume", "runs/x/last.pt", "--recipe", "full"])
    assert exited.value.code == 2 and "drop --recipe" in capsys.readouterr().err


def test_wandb_auto_is_saved_as_the_mode_it_chose(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc holding a W&B login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert parse_args([])[0].wandb == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "a-key")
    assert parse_args([])[0].wandb == "online"
    assert parse_args(["--wandb", "disabled"])[0].wandb == "disabled"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--threads", "0"], "--threads must be 1 to 1,024, got 0"),
        (["--threads", "1000000"], "--threads must be 1 to 1,024"),
        (["--num-workers", "1000"], "--num-workers must be 0 to 64"),
        (["--max-steps", "-1"], "--max-steps must be 0 to"),
        (["--device", "meta"], "expected auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_a_usage_error_is_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exited:
        parse_args(flags)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and message in err


def test_weight_averaging_moves_every_float_tensor_by_the_ramped_decay_and_copies_counters():
    from train_encoder_decoder import update_ema

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(2, 2))
    averaged = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 7
    before = {k: v.clone() for k, v in averaged.state_dict().items()}
    update_ema(averaged, model, step=5, decay=0.999)  # early steps: d = (1 + 5) / (10 + 5), not the decay
    d = 6 / 15
    for name, value in averaged.state_dict().items():
        current = model.state_dict()[name]
        if value.dtype.is_floating_point:
            assert torch.allclose(value, d * before[name] + (1 - d) * current), name
        else:
            assert torch.equal(value, current), name
