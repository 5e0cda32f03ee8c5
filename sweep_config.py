"""The hyper-parameter sweep, in wandb's sweep format, and the budget of one trial.

    uv run python train_encoder_decoder.py --run-type sweep --count 8             # online if logged in to W&B
    uv run python train_encoder_decoder.py --run-type sweep --count 8 --offline   # sampled here, no server

Online, SWEEP goes to wandb.sweep and wandb's agent picks the trials (and stops weak ones
early). Offline, sample_trials (below) samples the same parameters and sweeps.py runs them
(method "random" or "grid"; early termination needs the server, so offline every trial runs its
whole budget).
Each parameter is a setting of ModelConfig or TrainConfig (the flag --d-model is d_model); the metric is one
the training loop logs after every epoch.
"""

from __future__ import annotations

import itertools
import math
import random

SWEEP = {
    "method": "random",
    "metric": {"name": "val/sequence_accuracy", "goal": "maximize"},
    # Stops a trial after 2 or 4 validations (epochs) when it trails the others at that point.
    "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 2},
    "parameters": {
        # Around the default recipe (lr 1e-3, d_model 128, 3 + 2 layers, 4 heads, 12 px patches,
        # batch 64, no dropout or smoothing, augmentation 1.0), wide enough to find its edges,
        # small enough that a trial of TRIAL_BUDGET takes minutes on a 2-core CPU.
        "lr": {"distribution": "log_uniform_values", "min": 3e-4, "max": 3e-3},
        "d_model": {"values": [64, 96, 128]},
        "encoder_layers": {"values": [2, 3, 4]},
        "decoder_layers": {"values": [1, 2]},
        "n_heads": {"values": [2, 4]},
        "dim_k": {"values": [0, 16, 32]},  # query/key width per head; 0: d_model / n_heads
        "patch_size": {"values": [8, 12]},
        "dropout": {"values": [0.0, 0.1]},
        "label_smoothing": {"values": [0.0, 0.1]},
        "batch_size": {"values": [32, 64, 128]},
        "augment_strength": {"distribution": "uniform", "min": 0.5, "max": 1.5},
    },
}

# Settings that --run-type sweep uses unless the command line (or --config) gives them: one
# trial is two epochs of 10,000 fresh composites. The full recipe needs many more to show its
# accuracy; a sweep only has to rank settings, which two short epochs already do.
TRIAL_BUDGET = {"epochs": 2, "train_images": 10000}


def draw(name: str, spec: dict, rng: random.Random) -> object:
    """One value of a parameter spec, as wandb's random search draws it."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
    low, high = spec.get("min"), spec.get("max")
    if low is None or high is None:
        raise ValueError(f"sweep parameter {name!r} needs value, values, or min and max: {spec}")
    distribution = spec.get(
        "distribution", "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform"
    )
    if distribution == "uniform":
        return rng.uniform(low, high)
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution == "int_uniform":
        return rng.randint(low, high)
    if distribution == "q_uniform":
        q = spec.get("q", 1.0)
        return round(rng.uniform(low, high) / q) * q
    raise ValueError(
        f"sweep parameter {name!r}: distribution {distribution!r} is not supported offline "
        "(uniform, log_uniform_values, int_uniform, q_uniform, or values)"
    )


def sample_trials(sweep: dict, count: int | None, seed: int) -> list[dict]:
    """The parameter sets of an offline sweep: count random draws, or for method "grid" every
    combination of the values (the first count of them if count is given). Bayesian search
    learns from a server-side model of the results, so it has no offline equivalent."""
    parameters = sweep["parameters"]
    if sweep["method"] == "grid":
        choices = {}
        for name, spec in parameters.items():
            if "value" not in spec and "values" not in spec:
                raise ValueError(f"a grid sweep needs value or values for every parameter; {name!r} has {spec}")
            choices[name] = [spec["value"]] if "value" in spec else spec["values"]
        grid = [dict(zip(choices, combination)) for combination in itertools.product(*choices.values())]
        return grid[:count] if count else grid
    if sweep["method"] != "random":
        raise ValueError(f"method {sweep['method']!r} needs the W&B server; offline sweeps sample 'random' or 'grid'")
    if not count:
        raise ValueError("a random sweep needs a number of trials (--count)")
    rng = random.Random(seed)
    return [{name: draw(name, spec, rng) for name, spec in parameters.items()} for _ in range(count)]
