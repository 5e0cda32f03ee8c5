"""Sweeps: the config is made of real training flags and a logged metric, the offline sampler
follows wandb's spec, an offline sweep runs end to end and picks a config a run can load, and
the online path drives wandb's sweep and agent (a stand-in package: there is no W&B server here)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_script
from sweep_config import SWEEP, TRIAL_BUDGET, sample_trials
from train_encoder_decoder import SETTINGS, all_settings, make_configs, parse_args
from train_encoder_decoder import main as train_main


def test_every_sweep_parameter_and_trial_budget_is_a_setting():
    for name in [*SWEEP["parameters"], *TRIAL_BUDGET]:
        assert name in SETTINGS, f"{name} is not a field of ModelConfig or TrainConfig"
    assert SWEEP["method"] in ("random", "grid", "bayes") and SWEEP["metric"]["goal"] in ("maximize", "minimize")


def test_every_sampled_trial_makes_valid_configs():
    # 200 draws: every combination the sweep can produce passes the checks a command line's
    # settings pass (heads divide the width, patches tile the canvas, values within bounds).
    for trial in sample_trials(SWEEP, 200, seed=0):
        model_config, train_config = make_configs({**TRIAL_BUDGET, **trial})
        assert model_config.d_model == trial["d_model"] and train_config.lr == trial["lr"]


def test_the_offline_sampler_follows_wandbs_spec():
    spec = {
        "method": "grid",
        "parameters": {"a": {"values": [1, 2, 3]}, "b": {"value": "x"}, "c": {"values": [0.1, 0.2]}},
    }
    grid = sample_trials(spec, None, seed=0)
    assert len(grid) == 6 and {(t["a"], t["b"], t["c"]) for t in grid} == {
        (a, "x", c) for a in (1, 2, 3) for c in (0.1, 0.2)
    }
    assert sample_trials(spec, 4, seed=0) == grid[:4]
    spec = {
        "method": "random",
        "parameters": {
            "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            "n": {"min": 1, "max": 3},
            "p": {"values": ["a", "b"], "probabilities": [1, 0]},
        },
    }
    trials = sample_trials(spec, 400, seed=1)
    assert trials == sample_trials(spec, 400, seed=1)  # a seed gives the same sweep
    logs = [math.log10(t["lr"]) for t in trials]
    assert min(logs) >= -4 and max(logs) <= -2 and abs(sum(logs) / len(logs) + 3) < 0.1  # uniform in log space
    assert {t["n"] for t in trials} == {1, 2, 3} and {t["p"] for t in trials} == {"a"}
    with pytest.raises(ValueError, match="needs the W&B server"):
        sample_trials({**spec, "method": "bayes"}, 2, seed=0)
    with pytest.raises(ValueError, match="not supported offline"):
        sample_trials(
            {"method": "random", "parameters": {"x": {"distribution": "normal", "min": 0, "max": 1}}}, 1, seed=0
        )
    with pytest.raises(ValueError, match="grid sweep needs value or values"):
        sample_trials({"method": "grid", "parameters": {"x": {"min": 0.0, "max": 1.0}}}, None, seed=0)


def test_an_offline_sweep_of_two_tiny_trials_writes_a_summary_and_a_best_config_a_run_loads(
    tmp_path, tiny_data_dir, mnist_root, capsys
):
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        "train_encoder_decoder.py",
        "--run-type",
        "sweep",
        "--count",
        "2",
        "--offline",
        "--data-dir",
        str(tiny_data_dir),
        "--mnist-root",
        str(mnist_root),
        "--out-dir",
        str(sweep_dir),
        "--epochs",
        "1",
        "--train-images",
        "64",
        "--stem-width",
        "16",
        "--stem-full-res",
        "0",
        env={"WANDB_DIR": str(tmp_path)},
    )
    metric = SWEEP["metric"]["name"]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["metric"] == metric and [t["trial"] for t in summary["trials"]] == [1, 2]
    assert all(0 <= t[metric] <= 1 and set(t["parameters"]) == set(SWEEP["parameters"]) for t in summary["trials"])
    table = (sweep_dir / "summary.md").read_text()
    assert table in result.stdout and len(table.splitlines()) == 4  # header, rule, two trials
    # Each trial is a normal training run (its own folder, checkpoints, settings) and an offline wandb run.
    for number in (1, 2):
        settings = json.loads((sweep_dir / f"trial-{number:02d}" / "config.json").read_text())
        assert {k: settings[k] for k in SWEEP["parameters"]} == summary["trials"][number - 1]["parameters"]
        assert settings["epochs"] == 1 and settings["train_images"] == 64  # the command line's budget
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 2
    best = json.loads((sweep_dir / "best_config.json").read_text())
    best_trial = max(summary["trials"], key=lambda t: t[metric])
    assert best == json.loads((sweep_dir / f"trial-{best_trial['trial']:02d}" / "config.json").read_text())
    assert f"--config {sweep_dir / 'best_config.json'}" in result.stdout
    # A normal run takes the best settings from the file; a flag on the command line still wins.
    _, model_config, train_config = parse_args(["--config", str(sweep_dir / "best_config.json"), "--lr", "0.0005"])
    assert all_settings(model_config, train_config) == {**best, "lr": 0.0005}
    # The same sweep again into its folder is refused, and the first one's files stay as they were.
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    again = ["--run-type", "sweep", "--count", "1", "--offline", "--out-dir", str(sweep_dir)]
    assert train_main(again) == 2
    assert f"{sweep_dir} holds an earlier sweep" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()} == before


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
