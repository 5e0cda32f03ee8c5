"""Sweeps: trials of sweep_config.SWEEP, each a training run with the trial's settings added to the
command line, through W&B's server and agent when logged in, else sampled here; then a summary
table and the best trial's settings (best_config.json) in the sweep folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from files import markdown_table
from runs import wandb_mode
from sweep_config import SWEEP, sample_trials


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


def trials_table(rows: list[dict], metric: str) -> str:
    """Markdown table of the trials: number, searched settings, metric, minutes."""
    names = list(SWEEP["parameters"])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    score = lambda row: "failed: " + row["error"] if "error" in row else f"{row[metric]:.4f}"
    lines = [
        [row["trial"], *(cell(row["parameters"][n]) for n in names), score(row), f"{row['minutes']:.1f}"]
        for row in rows
    ]
    return markdown_table(["trial", *names, metric, "minutes"], lines)


def new_sweep_folder(path: str) -> Path:
    """The sweep's folder, made; ValueError if it holds an earlier sweep, whose trials it would overwrite."""
    folder = Path(path)
    earlier = sorted(p.name for p in folder.glob("*") if p.name.startswith(("trial-", "summary.", "best_config")))
    if earlier:
        raise ValueError(
            f"{folder} holds an earlier sweep ({', '.join(earlier[:3])}, ...): give this one another --out-dir"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sweep(
    options: argparse.Namespace,
    argv: list[str],
    seed: int,
    train_trial: Callable[[list[str], object], dict],
    full_budget: dict,
) -> int:
    """Trials of sweep_config.SWEEP: through wandb's server and agent when logged in, else
    sampled here, each an offline wandb run. Every trial is a normal train() with the trial's
    settings added to this command line; the summary and the best trial's whole settings are
    written to OUT_DIR (default runs/sweep-DATE-TIME)."""
    sweep_dir = new_sweep_folder(options.out_dir or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
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
            result = train_trial([*argv, *trial_flags(parameters), "--out-dir", str(trial_dir)], run)
        except (ValueError, SystemExit) as error:  # settings the data refuses, or the parser (which exits)
            row["error"] = "refused by the argument parser (see above)" if isinstance(error, SystemExit) else str(error)
            if run is not None:
                run.finish(exit_code=1)
        else:
            if result["interrupted"]:
                return False
            if metric not in result["val"]:  # --max-steps stopped it before its first validation
                row["error"] = "stopped by --max-steps before its first validation"
            else:
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
    return summarise_sweep(rows, sweep_dir, metric, full_budget)


def summarise_sweep(rows: list[dict], sweep_dir: Path, metric: str, full_budget: dict) -> int:
    """Write summary.md, summary.json and the best trial's settings (best_config.json)."""
    table = trials_table(rows, metric)
    (sweep_dir / "summary.md").write_text(table + "\n")
    (sweep_dir / "summary.json").write_text(json.dumps({"metric": metric, "trials": rows}, indent=2) + "\n")
    print("\n" + table)
    scored = [row for row in rows if metric in row]
    if not scored:
        print(f"no trial finished; nothing written to {sweep_dir / 'best_config.json'}", file=sys.stderr)
        return 1
    pick = max if SWEEP["metric"]["goal"] == "maximize" else min
    best = pick(scored, key=lambda row: row[metric])
    # The trial's whole settings, its sweep budget included: --config reproduces the trial; add
    # --epochs and --train-images to train the chosen settings to the full budget.
    (sweep_dir / "best_config.json").write_text(json.dumps(best["settings"], indent=2) + "\n")
    print(
        f"\nbest: trial {best['trial']}, {metric} {best[metric]:.4f}; "
        f"its settings are in {sweep_dir / 'best_config.json'}:\n"
        f"  uv run python train_encoder_decoder.py --config {sweep_dir / 'best_config.json'} "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in full_budget.items())
    )
    return 0
