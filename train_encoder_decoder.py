"""Train the digit-sequence Transformer on fresh MNIST composites.

    uv run python train_encoder_decoder.py                         # the default run
    uv run python train_encoder_decoder.py --resume runs/default/last.pt
    uv run python train_encoder_decoder.py --run-type sweep --count 8  # trials of sweep_config.py (see sweep())
    uv run python train_encoder_decoder.py --config best_config.json   # flag values from a JSON file
    uv run torchrun --standalone --nproc_per_node=4 train_encoder_decoder.py   # data-parallel, 4 processes

Reads top to bottom: arguments, data (the digit pools and the val/test sets are made on the
first run), model and optimiser, wandb, the training loop (fresh composites every epoch,
warm-up + cosine learning rate, validation with greedy decoding after each epoch, `last.pt`
and `best.pt` checkpoints), then a test-set evaluation of the final weights written to
test_metrics.json and `model.pt`: those weights with their config and test metrics, without
optimiser state, ready to ship as checkpoints/digit_transformer.pt.
Ctrl-C (or SIGTERM) stops after the current step and saves last.pt; --resume continues exactly.

Under torchrun the same script trains data-parallel (DistributedDataParallel: gloo on CPUs,
nccl on GPUs): --batch-size stays the global batch, split evenly over the processes, so a run
takes the same steps with the same learning-rate schedule whatever the number of processes.
Validation and test sets are split too and the metrics gathered; rank 0 alone prints, logs
to wandb and writes files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import netrc
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from evaluate import SequenceAccuracy
from model import (
    PAD,
    STEMS,
    DigitSequenceTransformer,
    ModelConfig,
    TrainingLoss,
    configure_optimizer,
    encode_labels,
    patch_targets,
    pick_device,
    uint8_to_input,
    use_bf16,
)
from multidigit_generator import (
    FreshComposites,
    MnistUnavailableError,
    MultiDigitComposer,
    MultiDigitFolder,
    check_length_weights,
    default_mnist_root,
    load_mnist,
    parse_weights,
)
from split_multidigit_dataset import SPLITS_FILE, load_splits, prepare_splits
from sweep_config import SWEEP, TRIAL_DEFAULTS, sample_trials

# Flags that may differ when resuming; every other setting comes from the checkpoint.
RESUME_OVERRIDES = ("resume", "max_steps", "wandb", "num_workers", "device", "precision", "compile")
# Flags added after runs had been saved, with the value that reproduces those runs (not the
# current default), so an older last.pt resumes as the run it was.
FLAGS_OLDER_RUNS_LACK = {"length_weights": None, "stem_depth": 0, "stem_width": 32, "stem_full_res": 0, "ema_decay": 0.0, "patch_loss_weight": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-type", choices=("train", "sweep"), default="train",
                   help="sweep: train one trial after another with settings from sweep_config.py (online with a W&B "
                        "login, else sampled here), print a summary and write the best settings to best_config.json")
    p.add_argument("--count", type=int, help="sweep: number of trials (default: 8; a grid sweep: all its combinations)")
    p.add_argument("--config", metavar="FILE", help="JSON object of flag values (as best_config.json holds: "
                   '{"lr": 0.002, "d_model": 96, ...}); flags given on the command line win')
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default="data", help="holds splits.json, val/ and test/; made on first use")
    data.add_argument("--mnist-root", default=default_mnist_root(), help="folder with MNIST/raw/ (default: $MNIST_ROOT or data)")
    data.add_argument("--train-images", type=int, default=20000, help="fresh composites per epoch")
    data.add_argument("--max-digits", type=int, default=4)
    data.add_argument("--length-weights", type=parse_weights, metavar="W0,W1,...",
                      help="relative frequencies of 0, 1, ..., max-digits digits in training composites (default: "
                           "1,3,5,...: mostly full canvases, so compute goes to digits rather than to blank paper)")
    data.add_argument("--augment-strength", type=float, default=1.0)
    data.add_argument("--num-workers", type=int,
                      help="processes composing training images (default: none on a CPU, where a worker only "
                           "competes with PyTorch's threads for the same cores; on a GPU, up to 8 per process)")
    model = p.add_argument_group("model")
    model.add_argument("--patch-size", type=int, default=12)
    model.add_argument("--stem-depth", type=int, default=1,
                       help="conv stem: extra stride-1 3x3 convolutions at 1/4 resolution and on the patch grid")
    model.add_argument("--stem-width", type=int, default=64,
                       help="conv stem: channels at 1/4 resolution (half that before, twice that on the patch grid)")
    model.add_argument("--stem-full-res", type=int, default=8,
                       help="conv stem: channels of a stride-1 3x3 convolution at full resolution, before the first stride (0: none)")
    model.add_argument("--stem", choices=STEMS, default="conv", help="how patches become vectors: a small CNN or a linear projection")
    model.add_argument("--d-model", type=int, default=128)
    model.add_argument("--n-heads", type=int, default=4)
    model.add_argument("--encoder-layers", type=int, default=3)
    model.add_argument("--decoder-layers", type=int, default=2)
    model.add_argument("--ff-mult", type=int, default=4)
    model.add_argument("--dropout", type=float, default=0.0, help="fresh data every epoch already prevents memorising")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=11)
    optim.add_argument("--batch-size", type=int, default=64)
    optim.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    optim.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine decays to lr * this")
    optim.add_argument("--warmup-steps", type=int, default=100)
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--label-smoothing", type=float, default=0.0)
    optim.add_argument("--order-free", action="store_true",
                       help="score each image against its best ordering of the digits (loss minimised over the "
                            "permutations of the label); the best checkpoint is then picked by order-free accuracy")
    optim.add_argument("--patch-loss-weight", type=float, default=10.0,
                       help="weight of an auxiliary loss that classifies every encoder patch vector as the digit "
                            "it lies on, or none (0: off, and the model has no patch head)")
    optim.add_argument("--ema-decay", type=float, default=0.999,
                       help="validate, test and ship an exponential moving average of the weights with this decay "
                            "(0: the raw weights)")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    optim.add_argument("--max-steps", type=int, default=0, help="stop (and save last.pt) after this many steps; 0: run all epochs")
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", help="last.pt, best.pt, test_metrics.json and model.pt go here "
                     "(default: runs/default, or the resumed run's folder)")
    run.add_argument("--resume", help="continue from this checkpoint (normally OUT_DIR/last.pt)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps ... "
                     "(under torchrun, each process takes the GPU of its LOCAL_RANK)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="bf16: matrix products in bfloat16 under autocast (weights, optimiser and loss stay fp32); "
                          "auto: bf16 where it was measured to pay, on CPUs with AVX512-BF16 or AMX; fp32 elsewhere "
                          "(an AVX2-only CPU emulates bf16, 100x slower; on an H100 this small model trains faster "
                          "in fp32 at batch 64: see model.use_bf16 and bench.py)")
    run.add_argument("--compile", action="store_true", help="train through torch.compile (a minute or so of compiling first)")
    run.add_argument("--wandb", choices=("auto", "online", "offline", "disabled"), default="auto",
                     help="auto: online when logged in to W&B, offline otherwise")
    run.add_argument("--offline", dest="wandb", action="store_const", const="offline", help="the same as --wandb offline")
    run.add_argument("--wandb-project", default="digit-sequence-transformer")
    run.add_argument("--log-every", type=int, default=25, help="steps between training-loss logs")
    args = p.parse_args(argv)
    # Defaults that depend on other flags: a sweep trial's short budget, then the --config file.
    defaults = dict(TRIAL_DEFAULTS) if args.run_type == "sweep" else {}
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as error:
            p.error(f"--config {args.config}: {error}")
        if not isinstance(config, dict):
            p.error(f"--config {args.config}: expected a JSON object of flag values, got {type(config).__name__}")
        unknown = sorted(k for k in config if k not in vars(args) or k == "config")
        if unknown:
            p.error(f"--config {args.config}: not training flags: {', '.join(unknown)}")
        defaults.update(config)
    if defaults:
        p.set_defaults(**defaults)
        args = p.parse_args(argv)
    if args.length_weights is None:
        args.length_weights = [2.0 * n + 1 for n in range(args.max_digits + 1)]
    positive = ("train_images", "max_digits", "epochs", "batch_size", "patch_size", "d_model", "n_heads",
                "encoder_layers", "decoder_layers", "ff_mult", "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0 or not 0 <= args.min_lr_ratio <= 1 or args.warmup_steps < 0 or args.weight_decay < 0:
        p.error("need --lr > 0, 0 <= --min-lr-ratio <= 1, --warmup-steps >= 0 and --weight-decay >= 0")
    try:
        check_length_weights(args.length_weights, args.max_digits)
    except ValueError as error:
        p.error(f"--length-weights: {error}")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.stem_depth < 0:
        p.error(f"--stem-depth must be >= 0, got {args.stem_depth}")
    if args.stem_full_res < 0:
        p.error(f"--stem-full-res must be >= 0, got {args.stem_full_res}")
    if args.stem_width < 2 or args.stem_width % 2:
        p.error(f"--stem-width must be an even number >= 2, got {args.stem_width}")
    if args.patch_loss_weight < 0:
        p.error(f"--patch-loss-weight must be >= 0, got {args.patch_loss_weight}")
    if not 0 <= args.label_smoothing < 1 or args.max_steps < 0 or (args.num_workers or 0) < 0 or args.augment_strength < 0:
        p.error("need 0 <= --label-smoothing < 1 and non-negative --max-steps, --num-workers, --augment-strength")
    if args.count is not None and (args.count < 1 or args.run_type != "sweep"):
        p.error(f"--count is the number of sweep trials: at least 1, with --run-type sweep (got {args.count})")
    try:
        pick_device(args.device)
    except ValueError as error:
        p.error(f"--device: {error}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world_size:
        p.error(f"--batch-size {args.batch_size} is the global batch: it must split evenly over {world_size} processes")
    if world_size > 1 and args.run_type == "sweep":
        p.error("a sweep runs its trials one after another in one process: start it without torchrun")
    return args


def wandb_mode(requested: str) -> str:
    """'auto' means online when W&B credentials exist (WANDB_API_KEY or ~/.netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def start_distributed(requested_device: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the
    rendezvous address); without them this is a single process of rank 0."""
    device = pick_device(requested_device)
    if "RANK" not in os.environ:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return device, dist.get_rank(), dist.get_world_size()


def align_replicas(*modules: nn.Module) -> None:
    """Before anything is validated or saved: copy rank 0's buffers (BatchNorm running
    statistics) to every rank, then compare every weight and buffer across ranks. Gradients
    are averaged, so the weights agree; the running statistics are each rank's own (DDP
    broadcasts rank 0's before every forward, and the forward then updates them). Replicas
    that still differ mean a bug, and would make the saved rank-0 weights a different model
    from the one trained."""
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
    flat = torch.cat([t.detach().double().flatten() for module in modules for t in module.state_dict().values()])
    replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(replicas, flat)
    differing = [rank for rank, other in enumerate(replicas) if not torch.equal(other, replicas[0])]
    if differing:
        raise RuntimeError(f"data-parallel replicas diverged: ranks {differing} hold weights that differ from rank 0's")


def learning_rate(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr_ratio: float) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: DigitSequenceTransformer, dataset: Dataset, device: torch.device, desc: str, *, bf16: bool = False) -> tuple[dict, list]:
    """Teacher-forced loss and token accuracy, and greedy-decoded sequence accuracy. Under
    torchrun each rank reads every world-size-th image and the counts are gathered, so every
    rank returns the metrics of the whole set (and rank 0's first images as samples)."""
    model.eval()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world_size)), batch_size=256)
    loss_sum, token_correct, token_total = 0.0, 0, 0
    readings: list[tuple[list[str], list[str], list[str]]] = []  # (predictions, labels, layouts) per batch
    samples = []
    for images, labels, layouts in tqdm(loader, desc=desc, unit="batch", leave=False, disable=rank != 0):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            memory = model.encode(uint8_to_input(images.to(device)))  # once, for both teacher forcing and decoding
            inputs, targets = (t.to(device) for t in encode_labels(list(labels), model.config.max_digits))
            logits = model.decode(memory, inputs).float()
            predictions = model.greedy_decode_memory(memory).strings()
        loss_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD, reduction="sum").item()
        real = targets != PAD
        token_correct += ((logits.argmax(-1) == targets) & real).sum().item()
        token_total += real.sum().item()
        readings.append((predictions, list(labels), list(layouts)))
        if len(samples) < 24:
            samples += list(zip(images[: 24 - len(samples)], labels, predictions))
    shards = [(loss_sum, token_correct, token_total, readings)]
    if world_size > 1:
        shards = [None] * world_size
        dist.all_gather_object(shards, (loss_sum, token_correct, token_total, readings))
    accuracy = SequenceAccuracy()
    for _, _, _, shard_readings in shards:
        for batch in shard_readings:
            accuracy.update(*batch)
    loss_sum, token_correct, token_total = (sum(shard[i] for shard in shards) for i in range(3))
    sequence, order_free = accuracy.compute(), accuracy.compute(order_free=True)
    metrics = {"loss": loss_sum / token_total, "token_accuracy": token_correct / token_total,
               "sequence_accuracy": sequence.pop("all"), **{f"sequence_accuracy_{k}": v for k, v in sequence.items()},
               "order_free_accuracy": order_free.pop("all"), **{f"order_free_accuracy_{k}": v for k, v in order_free.items()}}
    return metrics, samples


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, *, step: int, decay: float) -> None:
    """ema = d * ema + (1 - d) * weights, BatchNorm statistics included. d ramps up from 0.1 to
    decay over the first steps, so early validations are not dragged back to the initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    for averaged, current in zip(ema_model.state_dict().values(), model.state_dict().values()):
        if averaged.dtype.is_floating_point:
            averaged.lerp_(current, 1 - d)
        else:
            averaged.copy_(current)  # BatchNorm's batch counter


def format_metrics(name: str, metrics: dict) -> str:
    parts = [f"{name}: sequence accuracy {metrics['sequence_accuracy']:.2%} "
             f"(order-free {metrics['order_free_accuracy']:.2%}, token {metrics['token_accuracy']:.2%})"]
    parts += [f"{k.removeprefix('sequence_accuracy_')} {v:.2%}" for k, v in metrics.items() if k.startswith("sequence_accuracy_")]
    return " | ".join(parts)


def ignore_interrupts(worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file and rename, so an interruption never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def random_state(device: torch.device) -> list[torch.Tensor]:
    """This process's torch random state (dropout's): the CPU generator's, and the GPU's on a GPU."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def train(args: argparse.Namespace, run=None) -> dict:
    """One training run; returns its results, with the last validation metrics under "val" by
    the names they are logged with. run: a wandb run already started (by a sweep agent)."""
    # ---- resume: every setting comes from the checkpoint, except RESUME_OVERRIDES
    checkpoint = None
    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
        overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES}
        args = argparse.Namespace(**{**FLAGS_OLDER_RUNS_LACK, **checkpoint["args"], **overrides, "out_dir": args.out_dir or checkpoint["args"]["out_dir"]})
    args.out_dir = args.out_dir or "runs/default"
    out_dir = Path(args.out_dir)
    # ---- processes: one, or one per torchrun worker; rank 0 (is_main) prints, logs and saves
    device, rank, world_size = start_distributed(args.device)
    is_main = rank == 0
    say = print if is_main else lambda *_, **__: None
    bf16 = use_bf16(args.precision, device)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    # Measured on the 2-core CPU: composing in this process runs 13 % more steps per second
    # than one worker process, whose work stalls PyTorch's threads on the cores they share. On
    # a GPU the composing is what limits: on an H100 with 16 cores, 8 workers trained at 1,138
    # img/s against 938 with 2. Each process on a machine takes its share of the cores.
    cores_per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    num_workers = args.num_workers if args.num_workers is not None else (0 if device.type == "cpu" else min(8, max(1, cores_per_process - 1)))
    torch.manual_seed(args.seed)  # the same on every rank: the replicas start as one model

    # ---- data: disjoint digit pools; val/test are fixed folders, train is composed fresh each epoch
    if is_main and not (Path(args.data_dir) / SPLITS_FILE).is_file():
        print(f"{args.data_dir}/{SPLITS_FILE} not found: splitting MNIST and composing val/test sets")
        prepare_splits(args.data_dir, mnist_root=args.mnist_root, composer=dict(max_digits=args.max_digits))
    if world_size > 1:
        dist.barrier()  # the other ranks wait for rank 0's val/test sets
    splits = load_splits(args.data_dir)
    if splits["composer"]["max_digits"] > args.max_digits:
        raise ValueError(f"{args.data_dir} holds images of up to {splits['composer']['max_digits']} digits, more than "
                         f"--max-digits {args.max_digits}: pass a new --data-dir to compose matching val/test sets")
    canvas_size = splits["composer"]["canvas_size"]
    mnist_images, mnist_labels = load_mnist(args.mnist_root, train=True)
    pool = np.asarray(splits["pools"]["train"])
    composer = MultiDigitComposer(mnist_images[pool], mnist_labels[pool], canvas_size=canvas_size,
                                  max_digits=args.max_digits, length_weights=args.length_weights,
                                  augment_strength=args.augment_strength)
    train_set = FreshComposites(composer, args.train_images, seed=args.seed)
    val_set, test_set = MultiDigitFolder(Path(args.data_dir) / "val"), MultiDigitFolder(Path(args.data_dir) / "test")
    steps_per_epoch = math.ceil(args.train_images / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    rank_batch = args.batch_size // world_size

    # ---- model and optimiser
    config = ModelConfig(image_size=canvas_size, patch_size=args.patch_size, stem=args.stem, stem_depth=args.stem_depth,
                         stem_width=args.stem_width, stem_full_res=args.stem_full_res, d_model=args.d_model, n_heads=args.n_heads,
                         encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers, ff_mult=args.ff_mult,
                         dropout=args.dropout, max_digits=args.max_digits, patch_head=args.patch_loss_weight > 0)
    model = DigitSequenceTransformer(config).to(device)
    optimizer = configure_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    # The averaged weights are what validation, the test set and model.pt see; the raw ones keep training.
    ema_model = copy.deepcopy(model).requires_grad_(False) if args.ema_decay > 0 else None
    evaluated = ema_model if ema_model is not None else model
    replicas = [model] + ([ema_model] if ema_model is not None else [])  # what every rank holds a copy of
    step, best_accuracy, wandb_id = 0, -1.0, None
    if world_size > 1:
        torch.manual_seed(args.seed + rank)  # from here on, each rank draws its own dropout masks
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        if ema_model is not None:
            ema_model.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, best_accuracy, wandb_id = checkpoint["step"], checkpoint["best_accuracy"], checkpoint.get("wandb_id")
        saved = checkpoint.get("random_states", [[checkpoint["rng_state"]]])  # one per rank; older runs: rank 0's CPU state
        if len(saved) == world_size:
            torch.set_rng_state(saved[rank][0])
            if device.type == "cuda" and len(saved[rank]) > 1:
                torch.cuda.set_rng_state(saved[rank][1], device)
        else:  # resumed on another number of processes: exact dropout masks cannot be replayed
            torch.manual_seed(args.seed + rank + world_size * step)
        say(f"resumed from {args.resume} at step {step} (epoch {step // steps_per_epoch})")
    objective: nn.Module = TrainingLoss(model, label_smoothing=args.label_smoothing,
                                        patch_loss_weight=args.patch_loss_weight, order_free=args.order_free)
    if world_size > 1:
        # Broadcasts rank 0's weights, then averages gradients across ranks during backward().
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
        # The stop flag travels over gloo even between GPUs: a CPU tensor, no GPU synchronisation per step.
        control_group = dist.new_group(backend="gloo")
    if args.compile:
        objective = torch.compile(objective)
    # Ctrl-C or SIGTERM (a cluster's preemption notice; torchrun passes Ctrl-C on to its
    # workers) asks the loop to stop after the current step and save. The terminal (and
    # `uv run`, which forwards it) may deliver one press more than once, so only a press more
    # than two seconds after the first aborts at once, without saving.
    stop_requested_at: float | None = None

    def request_stop(signum, frame):
        nonlocal stop_requested_at
        if stop_requested_at is None:
            stop_requested_at = time.monotonic()
            say("\nstopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr)
        elif time.monotonic() - stop_requested_at > 2:
            raise KeyboardInterrupt

    def stop_agreed() -> bool:
        """Whether any rank was asked to stop: all ranks must leave the loop at the same step."""
        if world_size == 1:
            return stop_requested_at is not None
        flag = torch.tensor([stop_requested_at is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group)
        return bool(flag)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    processes = f" ({world_size} processes x {rank_batch})" if world_size > 1 else ""
    say(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {config.grid_size}x{config.grid_size} patches; "
        f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size}{processes} on {device}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}{', compiled' if args.compile else ''}", flush=True)

    # ---- wandb
    import wandb  # imported here: slow to import, and not needed for --help

    if run is None:
        run = wandb.init(project=args.wandb_project, mode=wandb_mode(args.wandb) if is_main else "disabled", id=wandb_id,
                         resume="allow", config={**vars(args), "parameters": model.num_parameters(), "world_size": world_size})
    else:
        run.config.update({**vars(args), "parameters": model.num_parameters()}, allow_val_change=True)

    def state() -> dict:
        """What last.pt and best.pt hold; every rank must call it (the random states are gathered)."""
        random_states = [random_state(device)]
        if world_size > 1:
            random_states = [None] * world_size
            dist.all_gather_object(random_states, random_state(device))
        return {"config": asdict(config), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                **({"ema": ema_model.state_dict()} if ema_model is not None else {}),
                "args": vars(args), "step": step, "epoch": step // steps_per_epoch, "best_accuracy": best_accuracy,
                "rng_state": random_states[0][0], "random_states": random_states, "wandb_id": run.id}

    def save(name: str) -> None:
        """Write a checkpoint (every rank calls it; rank 0 writes), the replicas aligned already."""
        checkpoint_state = state()
        if is_main:
            save_checkpoint(out_dir / name, checkpoint_state)

    # ---- training loop
    # An order-free model may read the digits in any order, so exact match would misjudge it.
    selection_metric = "order_free_accuracy" if args.order_free else "sequence_accuracy"
    logged: dict = {}  # the last validation's metrics, as logged
    started = time.time()
    while step < total_steps:
        epoch, first_batch = divmod(step, steps_per_epoch)
        train_set.set_epoch(epoch)  # item i of epoch e is drawn from its own seed [seed, e, i]
        remaining = Subset(train_set, range(first_batch * args.batch_size, args.train_images))
        # Rank r reads items r, r + world_size, ...: together the ranks' k-th batches are exactly
        # global batch k, as one process would read it. No shuffling: the items are random already.
        sampler = DistributedSampler(remaining, num_replicas=world_size, rank=rank, shuffle=False) if world_size > 1 else None
        loader = DataLoader(remaining, batch_size=rank_batch, sampler=sampler, num_workers=num_workers,
                            worker_init_fn=ignore_interrupts,  # Ctrl-C is the main process's to handle
                            generator=torch.Generator().manual_seed(epoch))  # leaves the global RNG alone
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", initial=first_batch, total=steps_per_epoch,
                   disable=not is_main)
        for images, labels, _, boxes in bar:
            lr = learning_rate(step, total_steps=total_steps, warmup_steps=args.warmup_steps, lr=args.lr,
                               min_lr_ratio=args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = (t.to(device) for t in encode_labels(list(labels), args.max_digits))
            patch_classes = (patch_targets(boxes.to(device), list(labels), image_size=canvas_size, patch_size=args.patch_size)
                             if args.patch_loss_weight > 0 else None)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = objective(uint8_to_input(images.to(device)), inputs, targets, patch_classes,
                                 list(labels) if args.order_free else None)  # strings would make torch.compile recompile
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            if ema_model is not None:
                update_ema(ema_model, model, step=step, decay=args.ema_decay)
            step += 1
            if step % args.log_every == 0:
                logged_loss = loss.detach()
                if world_size > 1:
                    dist.all_reduce(logged_loss, op=dist.ReduceOp.AVG)  # the mean over ranks, not rank 0's share
                bar.set_postfix(loss=f"{logged_loss.item():.4f}", lr=f"{lr:.2e}")
                run.log({"train/loss": logged_loss.item(), "train/lr": lr, "epoch": step / steps_per_epoch}, step=step)
            if stop_agreed() or step == args.max_steps:
                if world_size > 1:
                    align_replicas(*replicas)
                save("last.pt")
                say(f"stopped at step {step}; saved {out_dir / 'last.pt'} (continue with --resume)")
                run.finish()
                return {"step": step}
        bar.close()

        if world_size > 1:
            align_replicas(*replicas)  # validated and saved below: what rank 0 writes is what every rank trained
        metrics, samples = evaluate(evaluated, val_set, device, desc="validating", bf16=bf16)
        images_per_second = step * args.batch_size / (time.time() - started)
        say(f"epoch {epoch + 1}: " + format_metrics("val", metrics) + f" | {images_per_second:.0f} img/s so far")
        logged = {f"val/{k}": v for k, v in metrics.items()}  # under these names for wandb, the sweep and train()'s result
        if is_main:
            table = wandb.Table(columns=["image", "truth", "prediction", "correct"])
            for image, label, prediction in samples:
                table.add_data(wandb.Image(image.numpy()), label, prediction, label == prediction)
            run.log({**logged, "val/samples": table, "epoch": epoch + 1}, step=step)
        if metrics[selection_metric] > best_accuracy:  # the same on every rank: the metrics are gathered
            best_accuracy = metrics[selection_metric]
            save("best.pt")
        save("last.pt")
        if stop_agreed():
            say(f"stopped after epoch {epoch + 1}; continue with --resume {out_dir / 'last.pt'}")
            run.finish()
            return {"step": step}

    # ---- the final weights (averaged, at the end of the cosine decay) on the test set (MNIST test digits only)
    # They are what model.pt ships, not best.pt's: on 2,000 validation images the epochs near
    # the end differ by a few images, and picking among them picked noise (see the README).
    wall = time.time() - started
    if world_size > 1:
        say(f"replicas identical: the weights and buffers of all {world_size} ranks agreed at every checkpoint")
    test_metrics = None  # a sweep trial ranks settings on validation: the test set is for the chosen one
    if args.run_type != "sweep":
        test_metrics, _ = evaluate(evaluated, test_set, device, desc="testing", bf16=bf16)
    result = {"test": test_metrics, "val": logged}
    if is_main:
        best_epoch = torch.load(out_dir / "best.pt", map_location="cpu", weights_only=True)["epoch"]
        result.update({f"val_best_{selection_metric}": best_accuracy, "best_epoch": best_epoch,
                       "train_wall_seconds": wall, "train_images_per_second": total_steps * args.batch_size / wall,
                       "parameters": model.num_parameters(), "device": str(device), "world_size": world_size,
                       "precision": "bf16" if bf16 else "fp32", "args": vars(args)})
        (out_dir / "test_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        save_checkpoint(out_dir / "model.pt", {"config": asdict(config), "model": evaluated.state_dict(), "args": vars(args),
                                               "step": step, "epoch": step // steps_per_epoch, "test_metrics": test_metrics})
        if test_metrics is not None:
            print(format_metrics("test", test_metrics))
            run.summary.update({f"test/{k}": v for k, v in test_metrics.items()})
        print(f"wrote {out_dir / 'best.pt'}, {out_dir / 'last.pt'}, {out_dir / 'test_metrics.json'} and {out_dir / 'model.pt'} "
              "(weights and config only: predict.py --checkpoint, or copy it to checkpoints/digit_transformer.pt to ship it)")
    run.finish()
    return result


def trial_flags(parameters: dict) -> list[str]:
    """{"d_model": 96, "lr": 0.002} -> ["--d-model", "96", "--lr", "0.002"]: a trial's settings
    go through the same parser, and the same checks, as a command line."""
    return [str(part) for name, value in parameters.items() for part in (f"--{name.replace('_', '-')}", value)]


def summary_table(rows: list[dict], metric: str) -> str:
    """Markdown table of the trials: number, searched settings, metric, minutes."""
    names = list(SWEEP["parameters"])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| trial | " + " | ".join(names) + f" | {metric} | minutes |", "|---" * (len(names) + 3) + "|"]
    for row in rows:
        score = "failed: " + row["error"] if "error" in row else f"{row[metric]:.4f}"
        lines.append(f"| {row['trial']} | " + " | ".join(cell(row["parameters"][n]) for n in names)
                     + f" | {score} | {row['minutes']:.1f} |")
    return "\n".join(lines)


def sweep(args: argparse.Namespace, argv: list[str]) -> int:
    """Trials of sweep_config.SWEEP: through wandb's server and agent when logged in, else
    sampled here, each an offline wandb run. Every trial is a normal train() with the trial's
    settings added to this command line; the summary and the best settings are written to
    OUT_DIR (default runs/sweep-DATE-TIME)."""
    sweep_dir = Path(args.out_dir or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    metric = SWEEP["metric"]["name"]
    count = args.count or (None if SWEEP["method"] == "grid" else 8)  # None: every combination of the grid
    rows: list[dict] = []

    def run_trial(parameters: dict, run=None) -> bool:
        """Train one trial and record its row; False if it was interrupted (Ctrl-C)."""
        number = len(rows) + 1
        print(f"\n== trial {number}: " + " ".join(trial_flags(parameters)), flush=True)
        started = time.time()
        row = {"trial": number, "parameters": parameters}
        try:
            result = train(parse_args([*argv, *trial_flags(parameters), "--out-dir", str(sweep_dir / f"trial-{number:02d}")]), run=run)
        except (ValueError, SystemExit) as error:  # settings the model refuses, or the parser (which exits)
            row["error"] = "refused by the argument parser (see above)" if isinstance(error, SystemExit) else str(error)
            if run is not None:
                run.finish(exit_code=1)
        else:
            if "val" not in result:
                return False
            row[metric] = result["val"][metric]
        rows.append({**row, "minutes": (time.time() - started) / 60})
        return True

    if wandb_mode(args.wandb) == "online":
        import wandb

        def agent_trial() -> None:
            # The agent's run is started here so that the settings it sampled (run.config) are
            # known before the model is built; train() then logs to that run.
            run = wandb.init()
            run_trial(dict(run.config), run=run)

        sweep_id = wandb.sweep(SWEEP, project=args.wandb_project)
        wandb.agent(sweep_id, function=agent_trial, project=args.wandb_project, count=count)
    else:
        print(f"sweep offline: {SWEEP['method']} search of sweep_config.py sampled here, every trial to its full budget "
              f"(early termination needs the W&B server); each trial is an offline wandb run (`wandb sync`)")
        for parameters in sample_trials(SWEEP, count, seed=args.seed):
            if not run_trial(parameters):
                print("sweep interrupted: summarising the finished trials")
                break

    table = summary_table(rows, metric)
    (sweep_dir / "summary.md").write_text(table + "\n")
    (sweep_dir / "summary.json").write_text(json.dumps({"metric": metric, "trials": rows}, indent=2) + "\n")
    print("\n" + table)
    scored = [row for row in rows if metric in row]
    if not scored:
        print(f"no trial finished; nothing written to {sweep_dir / 'best_config.json'}", file=sys.stderr)
        return 1
    pick = max if SWEEP["metric"]["goal"] == "maximize" else min
    best = pick(scored, key=lambda row: row[metric])
    (sweep_dir / "best_config.json").write_text(json.dumps(best["parameters"], indent=2) + "\n")
    print(f"\nbest: trial {best['trial']}, {metric} {best[metric]:.4f}; its settings are in {sweep_dir / 'best_config.json'}:\n"
          f"  uv run python train_encoder_decoder.py --config {sweep_dir / 'best_config.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if args.run_type == "sweep":
            return sweep(args, argv)
        train(args)
    except (MnistUnavailableError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
