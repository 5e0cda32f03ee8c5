"""Where and how the work runs: the device, and for each job (a training step, reading a batch,
reading one image) fp32 or bf16 autocast and, on a busy CPU, how many threads.

bf16 halves the bytes every matrix product moves, but whether it saves time depends on the
processor: GPUs and CPUs with bf16 arithmetic gain, CPUs that emulate it lose many times over,
and on some CPUs reading one image is slower in bf16 while training is faster. So "auto" times
this model's own job both ways on this machine, once, and keeps the answer (docs/performance.md
has the measurements on each machine kind).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from files import Staging, read_json
from model import DigitSequenceTransformer, configure_optimizer, uint8_to_input

PRECISION_JOBS = ("train", "read_batch", "read_one")  # a training step, reading a batch, reading one image
PROBE_BATCH = 64  # images per probed training step or batch reading
PROBE_ROUNDS = 5  # fp32 and bf16 timed back to back this many times; the median of the rounds' ratios decides
# bf16 must save at least this share of the time: on shared machines one round's ratio strays by
# several per cent (docs/training.md), and bf16 rounds every product, so a near-tie goes to fp32.
BF16_MIN_SAVING = 0.1


@dataclass
class Precision:
    """How a job runs: matrix products in bf16 under autocast or in fp32, on how many CPU threads, and why."""

    bf16: bool
    threads: int
    why: str

    def autocast(self, device: torch.device) -> typing.ContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


def precision_cache_file() -> Path:
    """Where probe results are kept, per machine, model shape and job ($XDG_CACHE_HOME or ~/.cache)."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "digit-sequence-transformer" / "precision.json"


def machine_name(device: torch.device) -> str:
    """What the probe's result depends on: the processor (or GPU) and the PyTorch build."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}"


def cpu_name() -> str:
    """The processor's model name, as Linux's /proc/cpuinfo gives it ("cpu" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "cpu"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")


def probe_work(model: DigitSequenceTransformer, job: str) -> typing.Callable[[], None]:
    """One unit of the job on random canvases, on a copy of the model (a training pass would move
    BatchNorm's statistics): a whole training step (forward, backward, gradient clipping and the
    AdamW update, whose fp32 share of the step dilutes what bf16 saves), or greedy reading."""
    model = copy.deepcopy(model).train(job == "train")
    device, size = next(model.parameters()).device, model.config.image_size
    images = torch.randint(
        0, 256, (1 if job == "read_one" else PROBE_BATCH, size, size), dtype=torch.uint8, device=device
    )
    if job != "train":
        return lambda: model.read(images)
    tokens = torch.randint(0, 10, (len(images), model.config.max_tokens), device=device)
    optimizer = configure_optimizer(model, lr=1e-6, weight_decay=0.0)

    def step() -> None:
        model(uint8_to_input(images), tokens).float().logsumexp(-1).mean().backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(
    work: typing.Callable[[], object], device: torch.device, *, runs: int, seconds: float = 0.0, warm_up: int = 1
) -> tuple[list[float], float]:
    """Wall seconds of each call of work, after warm_up calls (allocations, autocast's weight casts,
    kernels chosen): at least runs calls and at least seconds in all; and the CPU seconds this
    process spent per wall second meanwhile (below the thread count: the cores are shared)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warm_up):
        work()
    sync()
    times, cpu_seconds = [], 0.0
    while len(times) < runs or sum(times) < seconds:
        started, cpu = time.perf_counter(), time.process_time()
        work()
        sync()
        times.append(time.perf_counter() - started)
        cpu_seconds += time.process_time() - cpu
    return times, cpu_seconds / sum(times)


def time_job(
    work: typing.Callable[[], object], precision: Precision, device: torch.device, runs: int
) -> tuple[float, float]:
    """(median seconds per run, CPU seconds per wall second) of work in precision."""
    torch.set_num_threads(precision.threads)
    with precision.autocast(device):
        times, busy = timed(work, device, runs=runs)
    return statistics.median(times), busy


def bf16_product_slowdown(device: torch.device) -> float:
    """How many times longer a bf16 matrix product, of the sizes this model multiplies, takes than
    fp32: tens of times on CPUs that emulate bf16, so the whole job need not be timed there."""
    a, b = torch.randn(512, 256, device=device), torch.randn(256, 512, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()
    as_is = Precision(False, torch.get_num_threads(), "")
    return time_job(lambda: a16 @ b16, as_is, device, runs=5)[0] / time_job(lambda: a @ b, as_is, device, runs=5)[0]


def choose_precision(
    requested: str, model: DigitSequenceTransformer, job: str, *, probe_threads: bool = True
) -> Precision:
    """The precision, and on a busy CPU the thread count, for a job of this model on this machine.
    "fp32" and "bf16" are taken as asked; "auto" times the job both ways and takes bf16 only where
    it saved at least BF16_MIN_SAVING of the time (fp32 untimed where bf16 products alone are far
    slower), cached per machine, model shape and job. Threads are timed afresh whenever the job's
    threads find their cores taken (less CPU time than wall time), which changes from run to run."""
    device, threads = next(model.parameters()).device, torch.get_num_threads()
    # The probe's random canvases and dropout draw from torch's generators: put back as they were,
    # so that a run draws the same numbers whether or not its precision was timed or cached.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if requested != "auto":
            chosen = Precision(requested == "bf16", threads, f"{requested}, as asked")
        else:
            chosen = _measured_precision(model, job, device, threads)
        if device.type == "cpu" and threads > 1 and probe_threads:
            chosen = _fewer_threads_if_busy(probe_work(model, job), device, chosen)
    torch.set_num_threads(chosen.threads)
    return chosen


def _measured_precision(model: DigitSequenceTransformer, job: str, device: torch.device, threads: int) -> Precision:
    # The rule is part of the key: a choice made by another rule is timed again.
    rule = f"median of {PROBE_ROUNDS} rounds, bf16 if {BF16_MIN_SAVING:.0%} faster"
    shape = json.dumps(asdict(model.config), sort_keys=True)
    key = f"{job} | {rule} | {machine_name(device)} | {shape} | {threads} threads"
    cache_file = precision_cache_file()
    cached = _read_cache(cache_file).get(key)
    if isinstance(cached, dict) and isinstance(cached.get("bf16"), bool) and isinstance(cached.get("why"), str):
        return Precision(cached["bf16"], threads, cached["why"] + " (timed before, cached)")
    if device.type == "cpu" and (slowdown := bf16_product_slowdown(device)) > 2:
        chosen = Precision(False, threads, f"fp32: bf16 matrix products take {slowdown:.0f}x longer here")
    else:
        chosen = _time_both(probe_work(model, job), device, threads, job)
    cache = {**_read_cache(cache_file), key: {"bf16": chosen.bf16, "why": chosen.why}}  # read again: others write too
    # A read-only home, a full disk, a folder in the way: not cached, timed again next time.
    with contextlib.suppress(OSError, ValueError), Staging() as staging, open(staging.file(cache_file), "w") as file:
        json.dump(cache, file, indent=1)
    return chosen


def _time_both(work: typing.Callable[[], object], device: torch.device, threads: int, job: str) -> Precision:
    ratios = []  # bf16's time over fp32's, per round: a pair timed back to back shares the machine's mood
    for round_ in range(PROBE_ROUNDS):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        seconds = {bf16: time_job(work, Precision(bf16, threads, ""), device, runs=2)[0] for bf16 in order}
        ratios.append(seconds[True] / seconds[False])
    ratio = statistics.median_high(ratios)
    faster = ratio < 1 - BF16_MIN_SAVING
    spread = f"median of {PROBE_ROUNDS} rounds, {min(ratios):.2f}-{max(ratios):.2f}"
    timing = f"{job} timed {ratio:.2f}x fp32's time in bf16 ({spread})"
    return Precision(faster, threads, f"{'bf16' if faster else 'fp32'}: {timing}")


def _fewer_threads_if_busy(work: typing.Callable[[], object], device: torch.device, chosen: Precision) -> Precision:
    seconds, cpu_share = time_job(work, chosen, device, runs=2)
    if cpu_share >= 0.75 * chosen.threads:
        return chosen
    tried = {chosen.threads: seconds}
    for threads in range(chosen.threads - 1, 0, -1):
        tried[threads] = time_job(work, Precision(chosen.bf16, threads, ""), device, runs=2)[0]
    best = min(tried, key=tried.get)
    times = ", ".join(f"{n} thread{'s' * (n > 1)} {t * 1e3:.0f} ms" for n, t in sorted(tried.items()))
    busy = f"machine busy ({cpu_share:.1f} cores for {chosen.threads} threads)"
    return Precision(chosen.bf16, best, f"{chosen.why}; {busy}: {times}")


def _read_cache(path: Path) -> dict:
    try:
        return read_json(path, dict, "a JSON object")
    except (OSError, ValueError):  # none yet, unreadable or not an object: probe again
        return {}


def pick_device(requested: str = "auto") -> torch.device:
    """'auto': the first of cuda, mps and cpu that this machine has; anything else as given
    ("cuda:1"), if this machine has it (ValueError saying what it has otherwise)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ValueError(f"unknown device {requested!r}: expected auto, cpu, cuda, cuda:N or mps") from error
    if device.type not in ("cpu", "cuda", "mps") or (device.type == "cpu" and device.index):
        raise ValueError(f"device {requested!r}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {requested!r}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {requested!r}: MPS is not available here")
    return device
