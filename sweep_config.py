"""The hyper-parameter sweep, in wandb's sweep format, and the budget of one trial.

    uv run python train_encoder_decoder.py --run-type sweep --count 8             # online if logged in to W&B
    uv run python train_encoder_decoder.py --run-type sweep --count 8 --offline   # an Optuna study, no server

Online, SWEEP goes to wandb.sweep and wandb's agent picks the trials and stops weak ones early.
Offline, sweeps.py reads the same dict into an Optuna study: `method` chooses the sampler (random,
grid, bayes as TPE), `early_terminate` the pruner (hyperband, fed the metric after every epoch),
`parameters` the search space. Each parameter is a setting of ModelConfig or TrainConfig (the flag
--d-model is d_model); the metric is one the training loop logs after every epoch.
"""

from __future__ import annotations

SWEEP = {
    "method": "random",
    "metric": {"name": "val/sequence_accuracy", "goal": "maximize"},
    # Hyperband: a trial is stopped after 1, 2 or 4 validations (epochs) when it is not in the
    # better half (1 / eta) of the trials that got as far.
    "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2},
    "parameters": {
        # Around the default recipe, wide enough to find its edges, small enough that a trial of
        # TRIAL_BUDGET takes minutes on a 2-core CPU.
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

# Settings that --run-type sweep uses unless the command line (or --config) gives them: a few short
# epochs, for the pruner to judge a trial after each; a sweep only has to rank settings.
TRIAL_BUDGET = {"epochs": 4, "train_images": 5000}
