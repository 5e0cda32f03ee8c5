"""Sweeps: trials of sweep_config.SWEEP, each a training run with the trial's settings added to the
command line; then a summary table, the best trial's settings (best_config.json) and, offline,
pictures of the search in the sweep folder.

Online (a W&B login) W&B's server and agent choose the trials and stop weak ones. Offline the
sweep is an Optuna study stored in a database (SQLite in the sweep folder, or any --storage URL):
its sampler and pruner come from SWEEP, each trial reports its validation metric after every
epoch so that the pruner can stop it, and a rerun of the same command continues the study
where it stopped. Several processes (--workers, or the same command on other machines sharing
a --storage database) take trials from one study; a process that dies stops sending its
heartbeat and its trial is run again by whoever is left.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState
from PIL import Image, ImageDraw, ImageFont

from files import Staging, markdown_table, process_running
from runs import wandb_mode
from sweep_config import SWEEP

HEARTBEAT_SECONDS, GRACE_SECONDS = 5, 20  # a trial silent for GRACE_SECONDS belongs to a dead process
STUDY_FILE = "study.db"
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER_VARIABLE = "SWEEP_WORKER"  # set in the processes --workers starts
optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own line for every trial


class TrialRefusedError(Exception):
    """A trial whose settings the parser or the data refuse: recorded as failed, the sweep goes on."""


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


# ---- SWEEP in Optuna's terms


def suggest(trial: optuna.Trial, parameters: dict) -> dict:
    """One trial's settings, drawn by the study's sampler from wandb's parameter specs."""
    drawn = {}
    for name, spec in parameters.items():
        low, high = spec.get("min"), spec.get("max")
        kind = spec.get("distribution", "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform")
        if "value" in spec:
            drawn[name] = spec["value"]
        elif "values" in spec and "probabilities" not in spec:
            drawn[name] = trial.suggest_categorical(name, spec["values"])
        elif low is None or high is None or "values" in spec:
            raise ValueError(f"sweep parameter {name!r} needs value, values (without probabilities), or min and max")
        elif kind in ("uniform", "log_uniform_values"):
            drawn[name] = trial.suggest_float(name, low, high, log=kind == "log_uniform_values")
        elif kind == "int_uniform":
            drawn[name] = trial.suggest_int(name, low, high)
        elif kind == "q_uniform":
            drawn[name] = trial.suggest_float(name, low, high, step=spec.get("q", 1.0))
        else:
            raise ValueError(
                f"sweep parameter {name!r}: distribution {kind!r} has no offline equivalent "
                "(uniform, log_uniform_values, int_uniform, q_uniform, or values)"
            )
    return drawn


def sampler_for(sweep: dict, seed: int) -> optuna.samplers.BaseSampler:
    """random -> random search, grid -> every combination of the values, bayes -> TPE."""
    method = sweep["method"]
    if method == "grid":
        space = {}
        for name, spec in sweep["parameters"].items():
            if "values" not in spec and "value" not in spec:
                raise ValueError(f"a grid sweep needs value or values for every parameter; {name!r} has {spec}")
            space[name] = spec.get("values", [spec.get("value")])
        return optuna.samplers.GridSampler(space, seed=seed)
    if method == "bayes":
        return optuna.samplers.TPESampler(seed=seed)
    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sweep method {method!r}: random, grid or bayes")


def pruner_for(sweep: dict) -> optuna.pruners.BasePruner:
    """early_terminate's hyperband (min_iter, eta): W&B's stops a run at each band (min_iter, then
    times eta) when it trails the runs that reached that band, all of them compared as one pool:
    asynchronous successive halving, Optuna's SuccessiveHalvingPruner. (Optuna's HyperbandPruner
    splits the trials over several brackets, too few in each to compare in a sweep of 8.)
    None: every trial runs whole."""
    stop = sweep.get("early_terminate")
    if not stop:
        return optuna.pruners.NopPruner()
    if stop.get("type") != "hyperband":
        raise ValueError(f"early_terminate {stop.get('type')!r}: only hyperband has an offline equivalent")
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=stop.get("min_iter", 1), reduction_factor=stop.get("eta", 3)
    )


def grid_size(sweep: dict) -> int:
    return math.prod(len(spec.get("values", [None])) for spec in sweep["parameters"].values())


# ---- the study


def without_flags(argv: list[str], flags: set[str]) -> list[str]:
    """argv without the given flags and their values (--flag value or --flag=value)."""
    return [arg for arg, before in zip(argv, ["", *argv]) if arg.split("=")[0] not in flags and before not in flags]


def study_command(argv: list[str]) -> list[str]:
    """The command line that defines a sweep's trials: argv without the flags that only say where
    and how it runs (workers, threads, storage, count, output folder, logging)."""
    where = {"--workers", "--threads", "--storage", "--count", "--out-dir", "--wandb", "--num-workers"}
    return without_flags([arg for arg in argv if arg != "--offline"], where)


def refuse_a_foreign_folder(folder: Path, storage_url: str | None) -> None:
    """ValueError if the folder holds anything but a sweep's files, or trials without their study."""
    names = {p.name for p in folder.glob("*")}
    sweep_files = {STUDY_FILE, "summary.md", "summary.json", "best_config.json", "history.png", "importances.png"}
    foreign = sorted(n for n in names - sweep_files if not n.startswith("trial-"))
    if foreign:
        raise ValueError(
            f"{folder} holds {', '.join(foreign[:3])}, not a sweep's files: give the sweep another --out-dir"
        )
    if names and STUDY_FILE not in names and not storage_url:
        raise ValueError(f"{folder} holds a sweep's files but no {STUDY_FILE} to continue it from: another --out-dir")


def open_study(sweep_dir: Path, storage_url: str | None, command: list[str], seed: int, prune: bool) -> optuna.Study:
    """The sweep's study, made or continued; ValueError if it was started with another command line."""
    with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
        storage = optuna.storages.RDBStorage(
            storage_url or f"sqlite:///{sweep_dir / STUDY_FILE}",
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
    study = optuna.create_study(
        study_name=sweep_dir.name, storage=storage, load_if_exists=True, direction=SWEEP["metric"]["goal"]
    )
    started_with = study.user_attrs.get("command")
    if started_with is None:
        study.set_user_attr("command", command)
    elif started_with != command:
        raise ValueError(
            f"the sweep {sweep_dir.name} was started as `{' '.join(started_with) or '(no settings)'}`: "
            "continue it with the same settings, or give this one another --out-dir"
        )
    # A fresh study's first process draws what the seed says; a rerun or another worker draws anew.
    others = len(study.trials) > 0 or os.environ.get(WORKER_VARIABLE)
    study.sampler = sampler_for(SWEEP, seed + (7919 * len(study.trials) + os.getpid() if others else 0))
    study.pruner = pruner_for(SWEEP) if prune else optuna.pruners.NopPruner()
    return study


def fail_dead_trials(study: optuna.Study) -> None:
    """Mark failed, and queue again, the running trials whose process is gone: those of this
    machine at once (their process is not running), the others once their heartbeat is stale."""
    # Heartbeats are marked experimental in Optuna, and stable in use.
    with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
        optuna.storages.fail_stale_trials(study)
    retry = study._storage.get_heartbeat_stale_trial_callback()  # open_study's: queue the trial again
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = trial.user_attrs.get("worker", ["", 0])
        if host == socket.gethostname() and not process_running(pid):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker was first
                study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
                retry(study, study._storage.get_trial(trial._trial_id))


def take_trials(study: optuna.Study, objective: Callable[[optuna.Trial], float], count: int) -> None:
    """Run trials until `count` are done (finished, pruned or refused), waiting while others' run:
    a worker that dies goes silent, and its trial is failed and queued again (fail_stale_trials)."""
    while True:
        fail_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in DONE or "error" in t.user_attrs for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)  # a WAITING one is queued: taken next
        if done >= count:
            return
        if done + running >= count:
            time.sleep(HEARTBEAT_SECONDS)
        else:
            study.optimize(objective, n_trials=1, catch=(TrialRefusedError,))


def trial_command(argv: list[str], parameters: dict, sweep_dir: Path, number: int) -> list[str]:
    """A trial's command line, said as the trial starts: the sweep's flags, the trial's settings, its folder."""
    print(f"\n== trial {number}: " + " ".join(trial_flags(parameters)), flush=True)
    return [*argv, *trial_flags(parameters), "--out-dir", str(sweep_dir / f"trial-{number:02d}")]


def trial_value(result: dict) -> float:
    """The metric a finished trial scores (its last validation: --max-steps may have stopped it early);
    ValueError if it was stopped before any."""
    if SWEEP["metric"]["name"] not in result["val"]:
        raise ValueError("stopped by --max-steps before its first validation")
    return result["val"][SWEEP["metric"]["name"]]


def refusal(error: ValueError | SystemExit) -> str:
    """Why a trial was refused: settings the data refuses, or the argument parser (which exits)."""
    return "refused by the argument parser (see above)" if isinstance(error, SystemExit) else str(error)


def sweep_trial(sweep_dir: Path, argv: list[str], train_trial: Callable[..., dict]) -> Callable[[optuna.Trial], float]:
    """The objective: one training run with the trial's settings, reporting after every epoch."""
    metric = SWEEP["metric"]["name"]

    def objective(trial: optuna.Trial) -> float:
        parameters = suggest(trial, SWEEP["parameters"])
        number = trial.number + 1
        trial.set_user_attr("worker", [socket.gethostname(), os.getpid()])
        flags = trial_command(argv, parameters, sweep_dir, number)
        started, pruned_after = time.time(), []

        def after_epoch(epoch: int, metrics: dict) -> bool:
            trial.report(metrics[metric], epoch)
            if trial.should_prune():  # never, with --no-pruning: the study's pruner is then NopPruner
                pruned_after.append(epoch)
            return not pruned_after

        try:
            result = train_trial(flags, None, after_epoch)
            if pruned_after:
                print(f"trial {number} pruned after epoch {pruned_after[0]}: it trails the trials that got as far")
                raise optuna.TrialPruned()
            if result["interrupted"]:
                raise KeyboardInterrupt  # Ctrl-C or SIGTERM: the trial is marked failed, the sweep stops
            value = trial_value(result)
        except (ValueError, SystemExit) as error:
            trial.set_user_attr("error", refusal(error))
            raise TrialRefusedError(refusal(error)) from None
        finally:
            trial.set_user_attr("minutes", (time.time() - started) / 60)
        trial.set_user_attr("settings", result["settings"])
        return value

    return objective


def start_workers(argv: list[str], workers: int) -> list[subprocess.Popen]:
    """workers - 1 more processes running this sweep's command, each taking trials from the study."""
    script = Path(__file__).with_name("train_encoder_decoder.py")
    command = [sys.executable, str(script), *without_flags(argv, {"--workers"}), "--workers", "1"]
    return [subprocess.Popen(command, env={**os.environ, WORKER_VARIABLE: "1"}) for _ in range(workers - 1)]


def sweep(
    options: argparse.Namespace,
    argv: list[str],
    trial_budget: dict,
    train_trial: Callable[..., dict],
    full_budget: dict,
) -> int:
    """Trials of sweep_config.SWEEP, through wandb's server and agent when logged in, else an
    Optuna study here; each trial a normal train() with the trial's settings added to this
    command line (an offline wandb run). The summary, the best trial's whole settings and the
    pictures go to OUT_DIR (default runs/sweep-DATE-TIME)."""
    sweep_dir = Path(options.out_dir or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    count = options.count or (grid_size(SWEEP) if SWEEP["method"] == "grid" else 8)
    if wandb_mode(options.wandb) == "online":
        return online_sweep(options, argv, sweep_dir, count, train_trial, full_budget)
    refuse_a_foreign_folder(sweep_dir, options.storage)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    prune = not options.no_pruning
    study = open_study(sweep_dir, options.storage, study_command(argv), trial_budget["seed"], prune)
    if options.workers > 1 and not options.threads:  # the cores shared among the workers
        argv = [*argv, "--threads", str(max(1, (os.cpu_count() or 1) // options.workers))]
    children = start_workers(argv, options.workers)
    print(
        f"sweep offline: Optuna study {sweep_dir.name} in {options.storage or sweep_dir / STUDY_FILE} "
        f"({len(study.trials)} trials so far), {SWEEP['method']} search, "
        f"{'hyperband pruning after every epoch' if prune else 'no pruning'}, {count} trials, {options.workers} "
        f"worker{'s' * (options.workers > 1)}; each trial an offline wandb run"
    )
    try:
        take_trials(study, sweep_trial(sweep_dir, argv, train_trial), count)
    except KeyboardInterrupt:
        print("sweep interrupted: the same command continues it; summarising the trials so far")
    for child in children:
        child.wait()
    return summarise(study_rows(study), sweep_dir, full_budget, study=study)


def online_sweep(
    options: argparse.Namespace, argv: list[str], sweep_dir: Path, count: int, train_trial: Callable, full_budget: dict
) -> int:
    """W&B's server picks the settings and stops weak trials; its agent runs them here, one after another."""
    import wandb

    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ValueError(f"{sweep_dir} is not empty: give the sweep another --out-dir")
    sweep_dir.mkdir(parents=True)
    rows: list[dict] = []

    def agent_trial() -> None:
        # The agent's run is started here so that the settings it sampled (run.config) are known
        # before the model is built; train() then logs to that run.
        run = wandb.init()
        parameters, started = dict(run.config), time.time()
        number = len(rows) + 1
        row: dict = {"trial": number, "parameters": parameters, "state": "finished"}
        try:
            result = train_trial(trial_command(argv, parameters, sweep_dir, number), run, None)
            row.update(value=trial_value(result), settings=result["settings"])
        except (ValueError, SystemExit) as error:
            row.update(state="failed: " + refusal(error), value=None)
            run.finish(exit_code=1)
        rows.append({**row, "minutes": (time.time() - started) / 60})

    sweep_id = wandb.sweep(SWEEP, project=options.wandb_project)
    wandb.agent(sweep_id, function=agent_trial, project=options.wandb_project, count=count)
    return summarise(rows, sweep_dir, full_budget)


# ---- what a sweep leaves: the table, the best settings, the pictures


def study_rows(study: optuna.Study) -> list[dict]:
    """The study's trials as summary rows: settings, state, metric (a pruned trial's last), minutes."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == TrialState.COMPLETE:
            state, value = "finished", t.value
        elif t.state == TrialState.PRUNED:
            last = max(t.intermediate_values, default=None)
            state, value = f"pruned after epoch {last}", t.intermediate_values.get(last)
        elif "error" in t.user_attrs:
            state, value = "failed: " + t.user_attrs["error"], None
        else:  # running elsewhere, stopped by Ctrl-C, or killed and queued again
            state, value = t.state.name.lower(), None
        row = {"trial": t.number + 1, "parameters": t.params, "state": state, "value": value}
        rows.append({**row, "minutes": t.user_attrs.get("minutes", 0.0), "settings": t.user_attrs.get("settings")})
    return rows


def trials_table(rows: list[dict], metric: str) -> str:
    """Markdown table of the trials: number, searched settings, metric, state, minutes."""
    names = list(SWEEP["parameters"])
    cell = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    searched = lambda row: [cell(row["parameters"].get(name)) for name in names]
    lines = [[row["trial"], *searched(row), cell(row["value"]), row["state"], round(row["minutes"], 1)] for row in rows]
    return markdown_table(["trial", *names, metric, "state", "minutes"], lines)


def summarise(rows: list[dict], sweep_dir: Path, full_budget: dict, study: optuna.Study | None = None) -> int:
    """Write summary.md, summary.json, the best finished trial's settings (best_config.json) and,
    for a study, history.png and importances.png; 1 if no trial finished."""
    metric, goal = SWEEP["metric"]["name"], SWEEP["metric"]["goal"]
    table = trials_table(rows, metric)
    print("\n" + table)
    finished = [row for row in rows if row["state"] == "finished"]
    best = (max if goal == "maximize" else min)(finished, key=lambda row: row["value"], default=None)
    with Staging() as staging:
        staging.file(sweep_dir / "summary.md").write_text(table + "\n")
        summary = {"metric": metric, "goal": goal, "trials": rows}
        staging.file(sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if study is not None:
            history_image(rows, metric, goal).save(staging.file(sweep_dir / "history.png"), format="PNG")
            importances_image(study, len(finished)).save(staging.file(sweep_dir / "importances.png"), format="PNG")
        if best is not None:
            # The trial's whole settings, its sweep budget included: --config reproduces the trial.
            staging.file(sweep_dir / "best_config.json").write_text(json.dumps(best["settings"], indent=2) + "\n")
    if best is None:
        print(f"no trial finished; nothing written to {sweep_dir / 'best_config.json'}", file=sys.stderr)
        return 1
    print(
        f"\nbest: trial {best['trial']}, {metric} {best['value']:.4f}; its settings are in "
        f"{sweep_dir / 'best_config.json'}:\n  uv run python train_encoder_decoder.py --config "
        f"{sweep_dir / 'best_config.json'} " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in full_budget.items())
    )
    return 0


def chart(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw, Callable[..., None]]:
    """A 640x400 picture titled title, its drawing context, and draw.text writing in black."""
    image = Image.new("RGB", (640, 400), "white")
    draw = ImageDraw.Draw(image)
    text = functools.partial(draw.text, fill="black", font=ImageFont.load_default(size=14))
    text((320, 16), title, anchor="mm")
    return image, draw, text


def history_image(rows: list[dict], metric: str, goal: str) -> Image.Image:
    """Each trial's metric by trial number (pruned trials hollow, at their last validation) and the
    best finished so far as a line."""
    image, draw, text = chart(f"optimisation history: {metric}")
    left, top, right, bottom = 70, 40, 620, 350
    scored = [row for row in rows if row["value"] is not None]
    values = [row["value"] for row in scored] or [0.0, 1.0]
    low, high = min(values), max(values)
    margin = 0.05 * (high - low if high - low >= 1e-9 else 1.0)
    low, high = low - margin, high + margin
    n = max([row["trial"] for row in rows], default=1)
    x = lambda trial: left + (right - left) * (trial - 0.5) / n
    y = lambda value: bottom - (bottom - top) * (value - low) / (high - low)
    draw.rectangle((left, top, right, bottom), outline="black")
    for i in range(5):
        value = low + (high - low) * i / 4
        text((left - 6, y(value)), f"{value:.3f}", anchor="rm")
    for trial in range(1, n + 1, max(1, n // 10)):
        text((x(trial), bottom + 12), str(trial), anchor="mm")
    text(((left + right) // 2, bottom + 30), "trial", anchor="mm")
    better = max if goal == "maximize" else min
    best, line = None, []
    for row in scored:
        r, (cx, cy) = 5, (x(row["trial"]), y(row["value"]))
        finished = row["state"] == "finished"
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill="#1f77b4" if finished else None, outline="#1f77b4")
        if finished:
            best = row["value"] if best is None else better(best, row["value"])
        if best is not None:
            line.append((cx, y(best)))
    if len(line) > 1:
        draw.line(line, fill="#d62728", width=2)
    text((left, 385), "filled: finished, hollow: pruned; red line: best so far", anchor="lm")
    return image


def importances_image(study: optuna.Study, finished: int) -> Image.Image:
    """Optuna's parameter importances (fANOVA over the finished trials) as horizontal bars."""
    image, draw, text = chart("parameter importances (share of the metric's variance)")
    if finished < 2:
        text((320, 200), "fewer than two finished trials: nothing to compare", anchor="mm")
        return image
    importances = optuna.importance.get_param_importances(study)
    bar = 300 / max(1, len(importances))
    for i, (name, share) in enumerate(importances.items()):
        top = 45 + i * bar
        text((170, top + bar / 2), name, anchor="rm")
        draw.rectangle((180, top + 3, 180 + 380 * share, top + bar - 3), fill="#1f77b4")
        text((186 + 380 * share, top + bar / 2), f"{share:.2f}", anchor="lm")
    return image
