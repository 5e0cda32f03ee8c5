"""Sweeps: the config is made of real training flags and a logged metric, every part of it maps
to the Optuna study that runs offline, an offline sweep runs end to end, continues where it
stopped (after kill -9 too) and is shared by workers without running a trial twice, its pruner
stops weak trials, and the online path drives wandb's sweep and agent (a stand-in package: there
is no W&B server here)."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from PIL import Image

import sweeps
from conftest import REPO, run_script
from sweep_config import SWEEP, TRIAL_BUDGET
from train_encoder_decoder import SETTINGS, all_settings, make_configs, parse_args
from train_encoder_decoder import main as train_main

METRIC = SWEEP["metric"]["name"]


def test_every_sweep_parameter_and_trial_budget_is_a_setting():
    for name in [*SWEEP["parameters"], *TRIAL_BUDGET]:
        assert name in SETTINGS, f"{name} is not a field of ModelConfig or TrainConfig"
    assert SWEEP["method"] in ("random", "grid", "bayes") and SWEEP["metric"]["goal"] in ("maximize", "minimize")


def test_every_parameter_maps_to_the_study_and_every_draw_makes_valid_configs():
    study = optuna.create_study(sampler=sweeps.sampler_for(SWEEP, seed=0))
    for _ in range(200):
        trial = study.ask()
        drawn = sweeps.suggest(trial, SWEEP["parameters"])
        assert set(drawn) == set(trial.params) == set(SWEEP["parameters"])  # every one searched by the study
        model_config, train_config = make_configs({**TRIAL_BUDGET, **drawn})
        assert model_config.d_model == drawn["d_model"] and train_config.lr == drawn["lr"]
        study.tell(trial, 0.0)
    for name, spec in SWEEP["parameters"].items():
        seen = {t.params[name] for t in study.trials}
        if "values" in spec:
            assert seen == set(spec["values"]), name
        else:
            assert spec["min"] <= min(seen) < max(seen) <= spec["max"], name
    logs = [math.log10(t.params["lr"]) for t in study.trials]  # log_uniform_values: uniform in log space
    assert abs(sum(logs) / len(logs) - (math.log10(3e-4) + math.log10(3e-3)) / 2) < 0.1


def test_wandbs_methods_distributions_and_early_termination_map_to_optuna():
    assert isinstance(sweeps.sampler_for({**SWEEP, "method": "bayes"}, 0), optuna.samplers.TPESampler)
    assert isinstance(sweeps.sampler_for({**SWEEP, "method": "random"}, 0), optuna.samplers.RandomSampler)
    pruner = sweeps.pruner_for({"early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2}})
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(sweeps.pruner_for({}), optuna.pruners.NopPruner)
    spec = {"a": {"values": [1, 2, 3]}, "b": {"value": "x"}, "c": {"values": [0.1, 0.2]}}
    grid = optuna.create_study(sampler=sweeps.sampler_for({"method": "grid", "parameters": spec}, 0))
    grid.optimize(lambda t: float(sweeps.suggest(t, spec)["a"]), n_trials=6)
    assert {(t.params["a"], t.params["c"]) for t in grid.trials} == {(a, c) for a in (1, 2, 3) for c in (0.1, 0.2)}
    assert sweeps.grid_size({"parameters": spec}) == 6
    kinds = {
        "i": ({"min": 1, "max": 3}, optuna.distributions.IntDistribution(1, 3)),
        "q": (
            {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
            optuna.distributions.FloatDistribution(0.0, 1.0, step=0.25),
        ),
        "l": (
            {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        ),
    }
    trial = optuna.create_study().ask()
    sweeps.suggest(trial, {name: spec for name, (spec, _) in kinds.items()})
    assert trial.distributions == {name: distribution for name, (_, distribution) in kinds.items()}
    for bad, message in (
        ({"x": {"distribution": "normal", "min": 0, "max": 1}}, "has no offline equivalent"),
        ({"x": {"values": [1, 2], "probabilities": [1, 0]}}, "without probabilities"),
        ({"x": {"min": 0.0}}, "needs value, values"),
    ):
        with pytest.raises(ValueError, match=message):
            sweeps.suggest(optuna.create_study().ask(), bad)
    with pytest.raises(ValueError, match="a grid sweep needs value or values"):
        sweeps.sampler_for({"method": "grid", "parameters": {"x": {"min": 0.0, "max": 1.0}}}, 0)


# fp32 as asked: each trial is a new model shape, which the precision probe would time first.
TINY_SWEEP = ["--stem-width", "16", "--stem-full-res", "0", "--num-workers", "0", "--precision", "fp32"]


def sweep_command(data_dir, mnist_root, out_dir, *extra):
    return [
        "--run-type", "sweep", "--offline", "--data-dir", str(data_dir), "--mnist-root", str(mnist_root),
        "--out-dir", str(out_dir), "--epochs", "1", "--train-images", "64", *TINY_SWEEP, *extra,
    ]  # fmt: skip


def test_an_offline_sweep_writes_its_results_and_a_rerun_continues_it_without_redoing_a_trial(
    tmp_path, tiny_data_dir, mnist_root, capsys
):
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(tiny_data_dir, mnist_root, sweep_dir)
    result = run_script("train_encoder_decoder.py", *command, "--count", "2", env={"WANDB_DIR": str(tmp_path)})
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["metric"] == METRIC and [t["trial"] for t in summary["trials"]] == [1, 2]
    assert all(0 <= t["value"] <= 1 and set(t["parameters"]) == set(SWEEP["parameters"]) for t in summary["trials"])
    table = (sweep_dir / "summary.md").read_text()
    assert table in result.stdout and len(table.splitlines()) == 4  # header, rule, two trials
    for picture in ("history.png", "importances.png"):
        assert Image.open(sweep_dir / picture).size == (640, 400)
    # Each trial is a normal training run (its own folder, checkpoints, settings) and an offline wandb run.
    for number in (1, 2):
        settings = json.loads((sweep_dir / f"trial-{number:02d}" / "config.json").read_text())
        assert {k: settings[k] for k in SWEEP["parameters"]} == summary["trials"][number - 1]["parameters"]
        assert settings["epochs"] == 1 and settings["train_images"] == 64  # the command line's budget
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 2
    best = json.loads((sweep_dir / "best_config.json").read_text())
    best_trial = max(summary["trials"], key=lambda t: t["value"])
    assert best == json.loads((sweep_dir / f"trial-{best_trial['trial']:02d}" / "config.json").read_text())
    assert f"--config {sweep_dir / 'best_config.json'}" in result.stdout
    # A normal run takes the best settings from the file; a flag on the command line still wins.
    _, model_config, train_config = parse_args(["--config", str(sweep_dir / "best_config.json"), "--lr", "0.0005"])
    assert all_settings(model_config, train_config) == {**best, "lr": 0.0005}
    # The same sweep again, asking for three: the two trials stay as they are and one more runs.
    first_two = {p: p.read_bytes() for p in sweep_dir.glob("trial-0[12]/*.pt")}
    run_script("train_encoder_decoder.py", *command, "--count", "3", env={"WANDB_DIR": str(tmp_path)})
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [t["trial"] for t in summary["trials"]] == [1, 2, 3] and {t["state"] for t in summary["trials"]} == {
        "finished"
    }
    assert {p: p.read_bytes() for p in sweep_dir.glob("trial-0[12]/*.pt")} == first_two
    # Continued with other settings, or into a folder holding something else, it is refused.
    assert train_main([*command, "--count", "4", "--lr", "0.002"]) == 2
    assert "was started as" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_text("a run's")
    assert train_main(sweep_command(tiny_data_dir, mnist_root, tmp_path / "run")) == 2
    assert "holds last.pt, not a sweep's files" in capsys.readouterr().err


def fake_training(curve_of, stopped_by_max_steps: bool = False):
    """A train_trial whose validation curve (one value an epoch) is curve_of(its lr, how many trials
    ran before it), reported after every epoch as training reports it."""
    calls = []

    def train_trial(argv: list[str], run: object, after_epoch) -> dict:
        lr = float(argv[argv.index("--lr") + 1])
        curve, settings = curve_of(lr, len(calls)), {"lr": lr}
        calls.append(lr)
        for epoch, value in enumerate(curve, start=1):
            if not after_epoch(epoch, {METRIC: value}):
                return {"finished": False, "interrupted": False, "val": {METRIC: value}, "settings": settings}
        stopped = {"finished": not stopped_by_max_steps, "interrupted": False}
        return {**stopped, "val": {METRIC: curve[-1]}, "settings": settings}

    return train_trial


def sweep_options(out_dir, **given) -> argparse.Namespace:
    defaults = dict(out_dir=str(out_dir), count=None, wandb="offline", storage=None, workers=1, threads=None)
    return argparse.Namespace(**{**defaults, "no_pruning": False, **given})


def test_the_pruner_stops_trials_that_trail_after_an_epoch_and_the_summary_says_so(tmp_path):
    # The first two trials learn well; every later one is worse than all before it, at every epoch.
    curve_of = lambda lr, before: [0.5, 0.7, 0.8, 0.9] if before < 2 else [0.3 - 0.01 * before] * 4
    budget = {"seed": 0, "epochs": 4}
    assert sweeps.sweep(sweep_options(tmp_path / "s", count=8), [], budget, fake_training(curve_of), {}) == 0
    rows = json.loads((tmp_path / "s" / "summary.json").read_text())["trials"]
    pruned = [row for row in rows if row["state"].startswith("pruned after epoch")]
    assert len(rows) == 8 and len(pruned) >= 3 and all(row["trial"] > 2 for row in pruned)
    assert max(row["value"] for row in rows) == 0.9 and (tmp_path / "s" / "best_config.json").is_file()
    # Without pruning every trial runs its whole curve.
    options = sweep_options(tmp_path / "all", count=8, no_pruning=True)
    assert sweeps.sweep(options, [], budget, fake_training(curve_of), {}) == 0
    rows = json.loads((tmp_path / "all" / "summary.json").read_text())["trials"]
    assert {row["state"] for row in rows} == {"finished"}


def test_a_trial_stopped_by_max_steps_keeps_its_last_validation_and_the_sweep_goes_on(tmp_path):
    options = sweep_options(tmp_path / "s", count=2, no_pruning=True)
    training = fake_training(lambda lr, before: [0.3 + 0.1 * before], stopped_by_max_steps=True)
    assert sweeps.sweep(options, [], {"seed": 0, "epochs": 1}, training, {}) == 0
    rows = json.loads((tmp_path / "s" / "summary.json").read_text())["trials"]
    assert sorted(row["value"] for row in rows) == [0.3, 0.4] and {row["state"] for row in rows} == {"finished"}


def study_states(sweep_dir) -> list[str]:
    study = optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'study.db'}")
    return [t.state.name for t in study.trials]


def test_two_workers_share_one_study_and_run_every_trial_once(tmp_path, tiny_data_dir, mnist_root):
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(tiny_data_dir, mnist_root, sweep_dir, "--count", "4", "--workers", "2", "--threads", "1")
    run_script("train_encoder_decoder.py", *command, env={"WANDB_DIR": str(tmp_path)})
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert sorted(p.name for p in sweep_dir.glob("trial-*")) == ["trial-01", "trial-02", "trial-03", "trial-04"]
    workers = {tuple(t.user_attrs["worker"]) for t in study.trials}
    assert len(workers) == 2, "both processes took trials"
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 4, "no settings drawn twice"


def test_a_sweep_killed_mid_trial_continues_and_completes_its_count(tmp_path, tiny_data_dir, mnist_root):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "train_encoder_decoder.py", *sweep_command(tiny_data_dir, mnist_root, sweep_dir)]
    env = {**os.environ, "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    process = subprocess.Popen(
        [*command, "--count", "2", "--epochs", "3"], cwd=REPO, env=env, stdout=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (sweep_dir / "trial-02" / "config.json").exists():  # the second trial has started training
        assert process.poll() is None and time.time() < deadline, "the sweep ended or hung before its second trial"
        time.sleep(0.5)
    first = (sweep_dir / "trial-01" / "model.pt").read_bytes()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert study_states(sweep_dir) == ["COMPLETE", "RUNNING"]
    done = subprocess.run(
        [*command, "--count", "2", "--epochs", "3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    # The killed trial failed and ran again (same settings, a new trial); the finished one was kept.
    assert study_states(sweep_dir) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert (sweep_dir / "trial-01" / "model.pt").read_bytes() == first
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert study.trials[1].params == study.trials[2].params


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"lr": 0.001, "bogus": 1}', "not settings: bogus"),
        ('{"d_model": "wide"}', "--d-model must be int, got 'wide'"),
        ("{not json", "Expecting property name"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, content, message, capsys):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exited:
        train_main(["--config", str(path)])
    assert exited.value.code == 2 and message in capsys.readouterr().err


# A stand-in for the wandb package, enough for the online path: wandb.sweep registers the
# config, wandb.agent calls the trial function `count` times, and each wandb.init() inside it
# returns a run whose config holds that trial's settings (here each parameter's first value or
# minimum), as W&B's server would hand them out. What the runs were given is written to a file.
FAKE_WANDB = """
import json, os
from types import SimpleNamespace

_sweeps, _pending, _finished = [], [], []

class _Config(dict):
    def update(self, values, allow_val_change=False):
        dict.update(self, values)

class _Run:
    id = "fake"
    def __init__(self, config):
        self.config, self.summary = _Config(config), {}
    def log(self, data, step=None):
        pass
    def finish(self, exit_code=0):
        _finished.append(dict(self.config))
        with open(os.environ["FAKE_WANDB_LOG"], "w") as f:
            json.dump({"sweeps": _sweeps, "runs": _finished}, f)

def sweep(config, project=None):
    _sweeps.append({"config": config, "project": project})
    return "sweep-1"

def agent(sweep_id, function, project=None, count=None):
    for _ in range(count):
        spec = _sweeps[-1]["config"]["parameters"]
        _pending.append({name: s["values"][0] if "values" in s else s["min"] for name, s in spec.items()})
        function()

def init(**kwargs):
    assert _pending and not kwargs, "wandb.init() is only called, bare, inside the agent"
    return _Run(_pending.pop())

Table = lambda columns: SimpleNamespace(add_data=lambda *row: None)
Image = lambda array: array
"""


def test_an_online_sweep_runs_its_trials_through_wandbs_agent(tmp_path, tiny_data_dir, mnist_root):
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb_calls.json"
    run_script(
        "train_encoder_decoder.py",
        "--run-type",
        "sweep",
        "--count",
        "2",
        "--wandb-project",
        "sweep-test",
        "--data-dir",
        str(tiny_data_dir),
        "--mnist-root",
        str(mnist_root),
        "--out-dir",
        str(tmp_path / "sweep"),
        "--epochs",
        "1",
        "--train-images",
        "32",
        "--precision",
        "fp32",
        env={"PYTHONPATH": str(tmp_path / "fake"), "WANDB_API_KEY": "not-a-real-key", "FAKE_WANDB_LOG": str(log)},
    )
    calls = json.loads(log.read_text())
    assert calls["sweeps"] == [{"config": SWEEP, "project": "sweep-test"}]
    first_values = {name: s["values"][0] if "values" in s else s["min"] for name, s in SWEEP["parameters"].items()}
    assert len(calls["runs"]) == 2
    for config in calls["runs"]:  # the agent's settings, trained with, and the run's whole config logged
        assert (
            {k: config[k] for k in first_values} == first_values and config["epochs"] == 1 and config["parameters"] > 0
        )
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [t["parameters"] for t in summary["trials"]] == [first_values, first_values]
    best = json.loads((tmp_path / "sweep" / "best_config.json").read_text())
    assert {k: best[k] for k in first_values} == first_values and best["epochs"] == 1
