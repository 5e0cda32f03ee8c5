"""The machinery around a training run: its processes (one, or one per torchrun worker, of which
rank 0 prints, logs and saves), the lock that keeps one run per folder, Ctrl-C and SIGTERM asking
it to stop after a step, the replicas checked to agree, the checkpoints that --resume continues
from (save_run_checkpoint, restore), the models a run starts from or distils, and wandb.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import netrc
import os
import signal
import socket
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from datasets import CachedComposites, leave_ctrl_c_to_the_parent
from files import file_digest, locked
from model import DigitSequenceTransformer, ModelConfig
from precision import Precision, pick_device

if typing.TYPE_CHECKING:  # for annotations only: nothing imports the training script
    from train_encoder_decoder import RunData, TrainConfig, TrainingState


@dataclass
class Processes:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, *args: object, **kwargs: object) -> None:
        if self.is_main:
            print(*args, **kwargs)


def start_processes(requested_device: str) -> Processes:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous address); without them
    this is a single process of rank 0."""
    device = pick_device(requested_device)
    if "RANK" not in os.environ:
        return Processes(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
    )
    return Processes(device, dist.get_rank(), dist.get_world_size())


def cores_per_process() -> int:
    """Each process on a machine takes its share of the cores."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


DEFAULT_RUN_FOLDER = "runs/default"  # a run's --out-dir unless it says otherwise
# What a run has to show for its work: a folder holding any of them belongs to a run (one with only
# config.json holds a start that failed).
RUN_FILES = ("last.pt", "best.pt", "model.pt", "test_metrics.json")


def refuse_a_used_run_folder(out_dir: Path) -> None:
    """Raise ValueError if out_dir holds another run's files: a new run there would replace some
    of them and leave the others, two runs mixed in one folder and the first one's last.pt lost."""
    if held := [name for name in RUN_FILES if (out_dir / name).exists()]:
        go_on = f"continue it with --resume {out_dir / 'last.pt'}, or " if "last.pt" in held else ""
        raise ValueError(f"{out_dir} holds another run ({', '.join(held)}): {go_on}give this run another --out-dir")


class RunFolderBusyError(RuntimeError):
    """Another training run holds the run folder."""


@contextlib.contextmanager
def run_lock(folder: Path, procs: Processes) -> typing.Iterator[None]:
    """One training run per folder: rank 0 holds an exclusive lock on OUT_DIR/.lock while it trains,
    so that a second run into the same folder stops at once, naming the first, instead of the two
    overwriting each other's checkpoints. A crashed run leaves nothing stale behind (files.locked)."""
    if not procs.is_main:
        yield
        return
    path = folder / ".lock"
    with locked(path, wait=False) as file:  # closing the file releases the lock
        if file is None:
            holder = ""
            with contextlib.suppress(OSError):
                holder = path.read_text().strip()
            raise RunFolderBusyError(
                f"{folder} is in use by another training run ({holder or 'another process'}): wait for "
                "it to finish, stop it, or give this run another --out-dir"
            )
        file.truncate(0)
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        yield


def align_replicas(*modules: nn.Module) -> None:
    """Before anything is validated or saved: copy rank 0's buffers (BatchNorm running statistics,
    which each rank's forward updates) to every rank, then compare every weight and buffer across
    ranks. Replicas that still differ mean a bug: rank 0 would save another model than the one trained."""
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
    flat = torch.cat([t.detach().double().flatten() for module in modules for t in module.state_dict().values()])
    replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(replicas, flat)
    differing = [rank for rank, other in enumerate(replicas) if not torch.equal(other, replicas[0])]
    if differing:
        raise RuntimeError(f"data-parallel replicas diverged: ranks {differing} hold weights that differ from rank 0's")


def gather(value: object, procs: Processes) -> list:
    """Every rank's value, in rank order."""
    if procs.world_size == 1:
        return [value]
    values = [None] * procs.world_size
    dist.all_gather_object(values, value)
    return values


class StopSignal:
    """Ctrl-C or SIGTERM (a cluster's preemption notice; torchrun passes Ctrl-C on to its
    workers) asks the loop to stop after the current step and save. The terminal (and `uv run`,
    which forwards it) may deliver one press more than once, so only a press more than two
    seconds after the first aborts at once, without saving."""

    def __init__(self, procs: Processes):
        self.procs, self.requested_at = procs, None
        # The flag travels over gloo even between GPUs: a CPU tensor, no GPU synchronisation per step.
        self.group = dist.new_group(backend="gloo") if procs.world_size > 1 else None

    def __enter__(self) -> StopSignal:
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exception: object) -> None:
        for signum, handler in self.previous.items():  # a sweep's next trial, or the caller, gets them back
            signal.signal(signum, handler)

    def request(self, signum: int, frame: object) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            if self.procs.is_main:
                print(
                    "\nstopping after this step, or this batch of composing (Ctrl-C again to abort without saving)",
                    file=sys.stderr,
                )
        elif time.monotonic() - self.requested_at > 2:
            raise KeyboardInterrupt

    def requested(self) -> bool:
        """Whether this process was asked to stop (a local check; agreed() is collective)."""
        return self.requested_at is not None

    def agreed(self) -> bool:
        """Whether any rank was asked to stop: all ranks must leave the loop at the same step."""
        flag = torch.tensor([self.requested()], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag)


def start_data_worker(worker_id: int) -> None:
    leave_ctrl_c_to_the_parent(worker_id)
    # The lowest priority: where cores are short, training threads preempted by a worker stall
    # each other, while the worker composes ahead in the gaps they leave (docs/performance.md).
    os.nice(19)


def random_state(device: torch.device) -> list[torch.Tensor]:
    """This process's torch random state (dropout's): the CPU generator's, and the GPU's on a GPU."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


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


class TrainingDivergedError(RuntimeError):
    """The loss or the weights stopped being finite numbers."""


def check_finite(training: TrainingState, loss: torch.Tensor | None, kept: str) -> None:
    """Stop a run whose loss or weights became NaN or infinite before anything is saved from it:
    raise TrainingDivergedError saying where, what is kept, and what to try."""
    weights_ok = all(torch.isfinite(p).all() for p in training.model.parameters())
    if weights_ok and (loss is None or torch.isfinite(loss).all()):
        return
    what = "the weights" if not weights_ok else "the loss"
    raise TrainingDivergedError(
        f"training diverged: {what} became NaN or infinite by step {training.step}; nothing was "
        f"saved from it, and {kept} keeps the last good state. Try a lower --lr, a --grad-clip, "
        "or --precision fp32, then --resume or start again"
    )


def load_named_checkpoint(flag: str, path: str, load: typing.Callable[[str], typing.Any]) -> typing.Any:
    """What load makes of the checkpoint a flag names; ValueError naming the flag if it cannot."""
    try:
        found = Path(path).is_file()
    except OSError as error:  # a name too long for the file system, say
        raise ValueError(f"{flag} {path}: {error.strerror or error}") from None
    if not found:
        raise ValueError(f"{flag} {path}: no such file")
    try:
        return load(path)
    except CheckpointError as error:
        raise ValueError(f"{flag} {error}") from None


def initial_weights(path: str, config: ModelConfig) -> dict:
    """The weights a checkpoint reads with (the averaged ones), for a model of this config;
    ValueError saying what stands in the way. Checked before the run writes or composes anything."""
    checkpoint = load_named_checkpoint("--init-from", path, load_checkpoint)
    if checkpoint["model_config"] != config:
        different = [k for k, v in asdict(config).items() if asdict(checkpoint["model_config"])[k] != v]
        raise ValueError(f"--init-from {path}: its model differs from this run's in {', '.join(different)}")
    try:
        DigitSequenceTransformer(config).load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:
        raise ValueError(f"--init-from {path}: weights that do not fit its own settings") from error
    return checkpoint["model"]


def load_teachers(paths: list[str], config: ModelConfig, train_config: TrainConfig) -> list[DigitSequenceTransformer]:
    """The models --distill-from names, on the CPU, frozen; ValueError naming one that cannot
    teach this model. Checked before the run writes or composes anything."""
    if paths and train_config.order_free:
        raise ValueError("--distill-from teaches token by token in reading order: it does not go with --order-free")
    teachers = []
    for path in paths:
        teacher = load_named_checkpoint("--distill-from", path, lambda p: load_model(p, "cpu", precision="fp32"))
        if (teacher.config.image_size, teacher.config.max_digits) != (config.image_size, config.max_digits):
            raise ValueError(
                f"--distill-from {path}: it reads {teacher.config.image_size}px canvases of up to "
                f"{teacher.config.max_digits} digits, this model {config.image_size}px and {config.max_digits}"
            )
        teachers.append(teacher.requires_grad_(False))
    return teachers


def restore(training: TrainingState, checkpoint: dict, procs: Processes) -> None:
    """Continue exactly where last.pt stopped: weights, averaged weights, optimiser, step and
    each rank's random state (on another number of processes, reseeded: the dropout masks of
    a different split of the batch cannot be replayed)."""
    state = checkpoint["training"]
    training.model.load_state_dict(state["weights"])
    if training.ema is not None:
        training.ema.load_state_dict(checkpoint["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.step, training.best_score, training.wandb_id = checkpoint["step"], state["best_score"], state["wandb_id"]
    training.seconds_before = state.get("train_seconds", 0.0)  # recorded by runs since it was
    training.val_metrics = checkpoint["metrics"]["val"]
    saved = state["random_states"]
    if len(saved) == procs.world_size:
        torch.set_rng_state(saved[procs.rank][0])
        if procs.device.type == "cuda" and len(saved[procs.rank]) > 1:
            torch.cuda.set_rng_state(saved[procs.rank][1], procs.device)
    else:
        torch.manual_seed(checkpoint["train_config"]["seed"] + procs.rank + procs.world_size * training.step)


def save_run_checkpoint(name: str, job: RunContext, training: TrainingState) -> None:
    """OUT_DIR/name (last.pt, best.pt): the model_config, train_config and weights to read with, as
    every checkpoint has them, plus what --resume needs. Every rank calls it (the random states
    are gathered); rank 0 writes. Weights that are no longer finite are never written."""
    check_finite(training, None, kept=str(job.out_dir / name))
    random_states = gather(random_state(job.procs.device), job.procs)
    if job.procs.is_main:
        save_checkpoint(
            job.out_dir / name,
            job.model_config,
            training.evaluated.state_dict(),
            train_config=asdict(job.train_config),
            step=training.step,
            metrics={"val": training.val_metrics},
            training={
                "weights": training.model.state_dict(),
                "optimizer": training.optimizer.state_dict(),
                "best_score": training.best_score,
                "random_states": random_states,
                "wandb_id": training.wandb_id,
                "data_dir": str(job.options.data_dir),
                "threads": torch.get_num_threads(),
                "init_from": job.options.started_from,
                "distill_from": job.options.distill_from,
                "wandb": job.options.wandb,
                "composite_cache": job.options.composite_cache,
                "splits_digest": job.options.splits_digest,
                "teacher_digests": job.options.teacher_digests,
                "train_seconds": training.seconds_trained(job),
            },
        )


def start_wandb(job: RunContext, training: TrainingState, run: object = None) -> object:
    """A wandb run logging every setting (offline without a W&B login; disabled on ranks > 0), or
    the sweep agent's run given, updated with them."""
    import wandb  # imported here: slow to import, and not needed for --help

    logged = {
        **job.settings,
        **vars(job.options),
        "parameters": training.model.num_parameters(),
        "world_size": job.procs.world_size,
    }
    if run is None:
        mode = wandb_mode(job.options.wandb) if job.procs.is_main else "disabled"
        run = wandb.init(
            project=job.options.wandb_project, mode=mode, id=training.wandb_id, resume="allow", config=logged
        )
    else:
        run.config.update(logged, allow_val_change=True)
    training.wandb_id = run.id
    return run


@dataclass
class RunContext:
    """What every stage of one training run reads: its settings, its processes, where it writes."""

    options: argparse.Namespace
    model_config: ModelConfig
    train_config: TrainConfig
    procs: Processes
    out_dir: Path
    num_workers: int  # processes feeding the training steps
    # Composing first (--compose): the processes composing each epoch before it is trained on; None: not so.
    composing_workers: int | None = None
    log: object = None  # the wandb run
    # How training steps and validation readings run here, chosen by timing them (precision.choose_precision).
    precision: Precision | None = None
    validation_precision: Precision | None = None
    started: float = 0.0  # when this process started training, and at which step: the ETA's basis
    first_step: int = 0
    settings: dict = field(default_factory=dict)  # every setting of both configs, as config.json holds them
    after_epoch: typing.Callable[[int, dict], bool] | None = None  # a sweep's pruner: False stops the run


def start_job(
    options: argparse.Namespace, model_config: ModelConfig, train_config: TrainConfig, settings: dict
) -> RunContext:
    """Start the processes and pick the data workers."""
    procs = start_processes(options.device)
    options.data_dir = options.data_dir or "data"
    out_dir = Path(options.out_dir or DEFAULT_RUN_FOLDER)
    # A CPU composes each epoch first, with every core, then trains on it: a worker composing
    # alongside slows the training threads whose cores it shares (docs/performance.md). A GPU
    # takes all the composing its cores can give, alongside, or, reading composed epochs
    # (--composite-cache), two workers. The processes of a torchrun compose alongside unless
    # asked: one epoch at a time, all but one of them would wait for it.
    compose_first = not options.composite_cache and (
        options.compose == "first"
        or (options.compose == "auto" and procs.device.type == "cpu" and procs.world_size == 1)
    )
    if compose_first:
        composing_workers = cores_per_process() if options.num_workers is None else options.num_workers
        return RunContext(options, model_config, train_config, procs, out_dir, 0, composing_workers, settings=settings)
    num_workers = options.num_workers
    if num_workers is None:
        num_workers = max(1, cores_per_process() - 1) if procs.device.type != "cpu" else 1
        num_workers = min(num_workers, 2) if options.composite_cache else num_workers
    return RunContext(options, model_config, train_config, procs, out_dir, num_workers, settings=settings)


def compose_ahead(job: RunContext, training: TrainingState, data: RunData, stop: StopSignal) -> bool:
    """With --composite-cache, compose the epochs this run is still to train (up to --max-steps)
    that are not cached yet, with every core; the processes of a torchrun share them out. False
    if asked to stop first."""
    if not isinstance(data.train_set, CachedComposites):
        return True
    procs, folder = job.procs, data.train_set.folder
    last = job.train_config.epochs
    if job.options.max_steps:
        last = min(last, math.ceil(job.options.max_steps / data.steps_per_epoch))
    epochs = range(training.step // data.steps_per_epoch, last)
    if not epochs:
        return True
    missing = data.train_set.missing(epochs)
    procs.say(
        f"training epochs {epochs.start + 1}-{epochs.stop} from {folder}: "
        + (f"composing {len(missing)} of them" if missing else "all composed already")
    )
    data.train_set.compose(missing, workers=cores_per_process(), progress=procs.is_main, stopped=stop.requested)
    if procs.world_size > 1:
        dist.barrier()
    if stop.agreed():
        procs.say(f"stopped while composing; the epochs composed so far stay in {folder} for the next run")
        return False
    return True


def compose_epoch_first(job: RunContext, data: RunData, epoch: int, stop: StopSignal) -> bool:
    """Compose the epoch in memory with --num-workers processes (unless it is held already), before
    it is trained on; False if asked to stop meanwhile."""
    data.train_set.compose(epoch, workers=job.composing_workers, progress=job.procs.is_main, stopped=stop.requested)
    return not stop.agreed()


def composing(job: RunContext) -> str:
    """How the training images are composed, as the run's log says it."""
    if job.options.composite_cache:
        return f"every epoch composed first and kept in {job.options.composite_cache}"

    def by(workers: int) -> str:
        return f"by {workers} worker process{'es' * (workers > 1)}" if workers else "in the training process"

    if job.composing_workers is not None:
        return f"each epoch composed {by(job.composing_workers)} before it is trained on (--compose first)"
    return f"composed {by(job.num_workers)} alongside the training steps (--compose alongside)"


def restore_settings(
    options: argparse.Namespace, train_config_class: type[TrainConfig]
) -> tuple[ModelConfig, TrainConfig, dict]:
    """The configs (the model's, and one of train_config_class) and the checkpoint of the run to
    resume; --out-dir defaults to its folder."""
    if not Path(options.resume).is_file():
        raise CheckpointError(f"--resume {options.resume}: no such file (a run keeps its last.pt in its --out-dir)")
    checkpoint = load_checkpoint(options.resume)
    if "training" not in checkpoint:
        raise CheckpointError(
            f"{options.resume} holds a model's weights only (an exported model.pt or a shipped "
            "model): resume from a run's last.pt, which also holds the optimiser state"
        )
    try:
        train_config = train_config_class(**checkpoint["train_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{options.resume}: unusable train_config ({error})") from error
    saved = checkpoint["training"]
    options.out_dir = options.out_dir or str(Path(options.resume).parent)
    options.data_dir = options.data_dir or saved["data_dir"]
    options.started_from = saved.get("init_from")
    options.distill_from = saved.get("distill_from", [])
    options.teachers = load_teachers(options.distill_from, checkpoint["model_config"], train_config)
    options.teacher_digests = [file_digest(Path(path)) for path in options.distill_from]
    recorded = saved.get("teacher_digests")  # recorded by runs since it was
    for path, now, then in zip(options.distill_from, options.teacher_digests, recorded or options.teacher_digests):
        if now != then:
            raise CheckpointError(
                f"--distill-from {path} is not the file the run was distilled from (its bytes changed since): "
                "put that teacher back, or start a new run"
            )
    options.wandb = options.wandb or saved.get("wandb", "auto")
    options.composite_cache = options.composite_cache or saved.get("composite_cache")
    options.splits_digest = saved.get("splits_digest")  # written by runs since it was recorded
    return checkpoint["model_config"], train_config, checkpoint
