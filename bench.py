"""How fast the digit-sequence Transformer trains and reads on this machine, against a model
of the same size built from torch.nn.Transformer, and how close each comes to the machine's
peak.

    uv run python bench.py                       # the shipped model's size, on a GPU if there is one
    uv run python bench.py --device cpu --json bench.json
    uv run python bench.py --precision bf16      # bf16 autocast (default: timed, precision.choose_precision)

For each model, one run measures:
  training img/s        whole steps (forward, backward, gradient clipping, AdamW) on batches of
                        --batch-size, with the training script's loss (digits + patch classes)
  inference img/s       greedy reading of batches of --batch-size
  latency p50 / p95     greedy reading of one image at a time (the batch's images in turn)
  FLOPs per image       counted by torch.utils.flop_counter: matrix products, convolutions and
                        attention (elementwise work is not counted)
  achieved FLOP/s       FLOPs per image x images per second, and its fraction of the peak (MFU)
The peak is measured here: the fastest square matrix product, in fp32 and in bf16.

The reference shares our convolutional stem, embeddings and heads and swaps our encoder and
decoder for torch.nn.Transformer's, configured as ours are (pre-norm, GELU, the same widths),
with our weights copied in: the two compute the same function (tests/test_bench.py checks), so
the ratios compare implementations alone. nn.TransformerDecoder keeps no keys and values
between calls, so the reference re-reads the whole prefix at each decoding step, the way an
nn.Transformer is decoded. Images are MNIST test composites made before timing starts; composing
them, and the training script's weight averaging, are not timed.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import sys
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_model
from datasets import dataset_item
from files import CommandLine, Staging, check_destination, markdown_table
from losses import TrainingLoss, patch_targets
from mnist import MnistUnavailableError, default_mnist_root, load_mnist
from model import (
    PIXEL_MEAN,
    PIXEL_STD,
    DecoderCache,
    DigitSequenceTransformer,
    ModelConfig,
    configure_optimizer,
    encode_labels,
    uint8_to_input,
)
from multidigit_generator import MultiDigitComposer
from precision import choose_precision, cpu_name, pick_device, timed
from reader import MAX_BATCH_SIZE

# The targets set for the 2-core development CPU (docs/performance.md discusses them).
TARGET_TRAINING_RATIO = 1.0  # training images/s, ours over the reference's
TARGET_INFERENCE_RATE = 2000  # batched inference, images/s
TARGET_LATENCY_MS = 10.0  # single-image latency p50


class ReferenceTransformer(DigitSequenceTransformer):
    """Our model with its encoder and decoder replaced by torch.nn.Transformer's."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        del self.encoder, self.encoder_norm, self.decoder, self.decoder_norm
        with warnings.catch_warnings():  # that pre-norm layers cannot use nested tensors (there is no padding here)
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.transformer = nn.Transformer(
                d_model=config.d_model,
                nhead=config.n_heads,
                num_encoder_layers=config.encoder_layers,
                num_decoder_layers=config.decoder_layers,
                dim_feedforward=config.ff_mult * config.d_model,
                dropout=config.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )

    @staticmethod
    def expresses(config: ModelConfig) -> bool:
        """Whether nn.Transformer can be this model: its heads are always d_model / n_heads wide
        (nn.MultiheadAttention's kdim and vdim are input widths, not head widths)."""
        return config.head_dim_k == config.head_dim_v == config.d_model // config.n_heads

    @classmethod
    def like(cls, model: DigitSequenceTransformer) -> ReferenceTransformer:
        """A reference holding model's weights: nn.MultiheadAttention keeps the query, key and
        value projections in one in_proj matrix, ours in `query` and `key_value`."""
        reference = cls(model.config)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(("encoder", "decoder"))}

        def copy(prefix: str, module: nn.Module) -> None:
            state.update({f"{prefix}.{name}": tensor for name, tensor in module.state_dict().items()})

        def copy_attention(prefix: str, attention: nn.Module) -> None:
            state[f"{prefix}.in_proj_weight"] = torch.cat([attention.query.weight, attention.key_value.weight])
            state[f"{prefix}.in_proj_bias"] = torch.cat([attention.query.bias, attention.key_value.bias])
            copy(f"{prefix}.out_proj", attention.out)

        def copy_layer(layer: str, attentions: dict[str, nn.Module], norms: list[nn.Module], ff: nn.Module) -> None:
            for name, attention in attentions.items():
                copy_attention(f"{layer}.{name}", attention)
            for n, norm in enumerate(norms, 1):
                copy(f"{layer}.norm{n}", norm)
            copy(f"{layer}.linear1", ff[0])
            copy(f"{layer}.linear2", ff[2])

        for i, block in enumerate(model.encoder):
            norms = [block.norm_attn, block.norm_ff]
            copy_layer(f"transformer.encoder.layers.{i}", {"self_attn": block.attn}, norms, block.ff)
        for i, block in enumerate(model.decoder):
            attentions = {"self_attn": block.self_attn, "multihead_attn": block.cross_attn}
            norms = [block.norm_self, block.norm_cross, block.norm_ff]
            copy_layer(f"transformer.decoder.layers.{i}", attentions, norms, block.ff)
        copy("transformer.encoder.norm", model.encoder_norm)
        copy("transformer.decoder.norm", model.decoder_norm)
        reference.load_state_dict(state)  # strict: every weight has exactly one counterpart
        return reference.to(next(model.parameters()).device).train(model.training)

    def encode(self, images: torch.Tensor, *, attention: dict | None = None) -> torch.Tensor:
        assert attention is None, "nn.Transformer does not return attention weights"
        return self.transformer.encoder(self.drop(self.patch_embed((images - PIXEL_MEAN) / PIXEL_STD)))

    def decode(
        self,
        memory: torch.Tensor,
        tokens: torch.Tensor,
        *,
        attention: dict | None = None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        assert attention is None, "nn.Transformer does not return attention weights"
        new = tokens.shape[1]
        if cache is not None:  # the cache keeps the tokens so far, re-read whole at every step
            cache.prefix = tokens if cache.length == 0 else torch.cat([cache.prefix, tokens], dim=1)
            cache.length += new
            tokens = cache.prefix
        t = tokens.shape[1]
        x = self.drop(self.token_embed(tokens) + self.token_position(torch.arange(t, device=tokens.device)))
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        return self.head(self.transformer.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True))[:, -new:]


def peak_matmul_flops(dtype: torch.dtype, device: torch.device, *, seconds: float) -> tuple[float, int]:
    """(FLOP/s, size) of the fastest n x n by n x n product over growing n. Sizes stop growing
    once one product takes over 0.1 s (a CPU without bf16 emulates it about 100x slower)."""
    best = (0.0, 0)
    for n in (256, 512, 1024, 2048, 4096, 8192):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        seconds_each = statistics.median(timed(lambda a=a, b=b: a @ b, device, runs=2, seconds=seconds, warm_up=2)[0])
        best = max(best, (2 * n**3 / seconds_each, n))
        if seconds_each > 0.1:
            break
    return best


def counted_flops(run: Callable[[], object]) -> int:
    """FLOPs of one call of run. nn.Transformer's fused inference path (one native op per
    layer) has no FLOP formula, so it is switched off while counting."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            run()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops()


def composites(count: int, mnist_root: str, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(images (count, 96, 96) uint8, labels, ink boxes (count, 4, 4)) composed from MNIST test
    digits as the test set is: 0 to 4 digits, scattered or in a row."""
    images, labels = load_mnist(mnist_root, train=False)
    composer = MultiDigitComposer(images, labels)
    rng = np.random.default_rng(seed)
    items = [
        dataset_item(c.image, c.label, c.layout, c.boxes, composer.max_digits)
        for c in (composer.compose(rng) for _ in range(count))
    ]
    images, labels, _, boxes = default_collate(items)
    return images, list(labels), boxes


class Workload:
    """The timed work for one model: a training step on a batch, greedy reading of the batch,
    and of one image (the batch's images in turn: 0 to 4 digits, so 1 to 5 decoding steps).
    It trains a copy, so model keeps its weights."""

    def __init__(
        self, model: DigitSequenceTransformer, data: tuple, *, device: torch.device, bf16: bool, compiled: bool
    ):
        images, labels, boxes = data
        config = model.config
        self.device, self.batch_size, self.images = device, len(labels), images.to(device)
        self.batch = (
            uint8_to_input(self.images),
            *(t.to(device) for t in encode_labels(labels, config.max_digits)),
            patch_targets(boxes, labels, image_size=config.image_size, patch_size=config.patch_size).to(device),
        )
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.trained = copy.deepcopy(model).train()
        self.loss = TrainingLoss(self.trained, label_smoothing=0.0, patch_loss_weight=10.0, order_free=False)
        self.compiled_loss = torch.compile(self.loss) if compiled else self.loss
        self.optimizer = configure_optimizer(self.trained, lr=1e-4, weight_decay=0.05)
        self.reader = copy.deepcopy(model).eval()
        if compiled:
            self.reader.encode = torch.compile(self.reader.encode)
            self.reader.decode = torch.compile(self.reader.decode)
        singles = [self.images[i][None] for i in range(self.batch_size)]
        self.readings = [self.read(single)[0] for single in singles]  # also compiles every shape before timing
        self.singles = itertools.cycle(singles)
        with self.autocast():  # counted uncompiled: compiled graphs hide their operations from the counter
            self.training_flops = counted_flops(lambda: self.loss(*self.batch).backward()) / self.batch_size
            self.inference_flops = counted_flops(lambda: model.read(self.images)) / self.batch_size

    def training_step(self) -> None:
        with self.autocast():
            loss = self.compiled_loss(*self.batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), 1.0)
        self.optimizer.step()

    def read(self, images: torch.Tensor) -> list[str]:
        with self.autocast():
            return self.reader.read(images).strings()

    def read_batch(self) -> None:
        self.read(self.images)

    def read_one(self) -> None:
        self.read(next(self.singles))


def measure(workloads: dict[str, Workload], *, rounds: int, seconds: float, latency_runs: int) -> dict[str, dict]:
    """Time the workloads in turn, in many short rounds, so that a machine that speeds up or
    slows down (a shared CPU does) weighs on each alike; medians over all rounds."""
    for work in workloads.values():
        timed(work.training_step, work.device, runs=2, warm_up=2)
        timed(work.read_batch, work.device, runs=2, warm_up=2)
    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "read": [], "one": []} for name in workloads}
    for _ in range(rounds):
        for name, work in workloads.items():
            each = dict(runs=1, seconds=seconds / rounds, warm_up=0)
            times[name]["train"] += timed(work.training_step, work.device, **each)[0]
            times[name]["read"] += timed(work.read_batch, work.device, **each)[0]
            times[name]["one"] += timed(work.read_one, work.device, runs=max(1, latency_runs // rounds), warm_up=0)[0]
    results = {}
    for name, work in workloads.items():
        train_rate = work.batch_size / statistics.median(times[name]["train"])
        read_rate = work.batch_size / statistics.median(times[name]["read"])
        results[name] = {
            "parameters": work.trained.num_parameters(),
            "readings": work.readings,
            "training_images_per_second": train_rate,
            "inference_images_per_second": read_rate,
            "latency_p50_ms": 1e3 * float(np.percentile(times[name]["one"], 50)),
            "latency_p95_ms": 1e3 * float(np.percentile(times[name]["one"], 95)),
            "training_flops_per_image": work.training_flops,
            "inference_flops_per_image": work.inference_flops,
            "training_flops_per_second": work.training_flops * train_rate,
            "inference_flops_per_second": work.inference_flops * read_rate,
        }
    return results


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def report(results: dict) -> str:
    """The results as a Markdown table, ours against the reference (columns of "-" without one)."""
    ours, reference = results["ours"], results.get("reference")
    peak, used = results["peak_flops_per_second"], results["precision"]
    rows = [
        ("parameters", "parameters", "{:,.0f}"),
        ("training img/s", "training_images_per_second", "{:,.0f}"),
        (f"inference img/s (greedy, batch {results['batch_size']})", "inference_images_per_second", "{:,.0f}"),
        ("latency p50, one image (ms)", "latency_p50_ms", "{:.2f}"),
        ("latency p95, one image (ms)", "latency_p95_ms", "{:.2f}"),
        ("training GFLOP/image (forward + backward)", "training_flops_per_image", "{:.3f}"),
        ("inference GFLOP/image (greedy)", "inference_flops_per_image", "{:.3f}"),
        ("training achieved GFLOP/s", "training_flops_per_second", "{:.1f}"),
        ("inference achieved GFLOP/s", "inference_flops_per_second", "{:.1f}"),
    ]
    scale = lambda key: 1e-9 if "flops" in key else 1
    lines = []
    for label, key, fmt in rows:
        theirs = fmt.format(reference[key] * scale(key)) if reference else "-"
        ratio = f"{ours[key] / reference[key]:.2f}x" if reference else "-"
        lines.append([label, fmt.format(ours[key] * scale(key)), theirs, ratio])
    for dtype in ("fp32", "bf16"):
        for kind in ("training", "inference"):
            label = f"{kind} MFU, of the {dtype} peak" + (" (the precision used)" if dtype == used else "")
            theirs = f"{reference[f'{kind}_flops_per_second'] / peak[dtype]:.1%}" if reference else "-"
            lines.append([label, f"{ours[f'{kind}_flops_per_second'] / peak[dtype]:.1%}", theirs, ""])
    header = (
        f"{results['machine']}; torch {results['torch']}; {used}{', compiled' if results['compile'] else ''}; "
        f"peak matrix product: fp32 {peak['fp32'] / 1e9:,.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:,.1f} GFLOP/s"
    )
    return header + "\n\n" + markdown_table(["", "ours", "nn.Transformer", "ours / reference"], lines)


def target_report(results: dict) -> str:
    """The CPU targets, met or not; for inference, also the ceiling the peak of the precision used sets."""
    ours, reference, used = results["ours"], results.get("reference"), results["precision"]
    ratio = ours["training_images_per_second"] / reference["training_images_per_second"] if reference else math.nan
    rate, latency = ours["inference_images_per_second"], ours["latency_p50_ms"]
    ceiling = results["peak_flops_per_second"][used] / ours["inference_flops_per_image"]

    def check(met: bool, target: str, value: str) -> str:
        return f"  {'met    ' if met else 'not met'}  {target}: {value}"

    training = f"{ratio:.2f}x" if reference else "no reference for this model"
    inference = f"{rate:,.0f} img/s (at 100 % of the {used} peak: {ceiling:,.0f})"
    one_image = f"{latency:.2f} ms"
    lines = [
        check(ratio >= TARGET_TRAINING_RATIO, f"training >= {TARGET_TRAINING_RATIO:.1f}x the reference", training),
        check(rate >= TARGET_INFERENCE_RATE, f"batched inference >= {TARGET_INFERENCE_RATE} img/s", inference),
        check(latency <= TARGET_LATENCY_MS, f"single-image latency p50 <= {TARGET_LATENCY_MS:.0f} ms", one_image),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = CommandLine(__doc__)
    p.add_argument(
        "--checkpoint", default=str(DEFAULT_CHECKPOINT), help="the model whose size (and weights) are measured"
    )
    p.add_argument(
        "--mnist-root", default=default_mnist_root(), help="folder with MNIST/raw/ (default: $MNIST_ROOT or data)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16: autocast to bfloat16; auto: as training picks it, bf16 where timing a training step here finds it "
        "faster (precision.choose_precision)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="time both models through torch.compile (training step, encoder and decoding step; "
        "a few minutes of compiling)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per training step and per inference batch")
    p.add_argument("--seconds", type=float, default=6.0, help="time spent on each throughput measurement of each model")
    p.add_argument("--latency-runs", type=int, default=240, help="single images read for the latency percentiles")
    p.add_argument("--rounds", type=int, default=12, help="the models are timed in turn this many times")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    p.check_range("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)
    p.check_range("--seconds", args.seconds, 0.01, 3600)
    p.check_range("--latency-runs", args.latency_runs, 2, 100_000)
    p.check_range("--rounds", args.rounds, 1, 1000)
    if args.json is not None:
        p.checked("--json", check_destination, args.json, None)  # before the benchmark, not after it
    args.device = p.checked("--device", pick_device, args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    try:
        model = load_model(args.checkpoint, device, precision="fp32")  # each workload autocasts as args say
        data = composites(args.batch_size, args.mnist_root, seed=0)
    except (CheckpointError, MnistUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    precision = choose_precision(args.precision, model, "train", probe_threads=False)
    print(f"precision: {precision.why}", file=sys.stderr)
    print(f"measuring the peak matrix product on {device} ...", file=sys.stderr)
    peak = {
        name: peak_matmul_flops(dtype, device, seconds=min(1.0, args.seconds))
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    results = {
        "machine": machine(device),
        "device": str(device),
        "torch": torch.__version__,
        "precision": "bf16" if precision.bf16 else "fp32",
        "compile": args.compile,
        "batch_size": args.batch_size,
        "peak_flops_per_second": {name: flops for name, (flops, _) in peak.items()},
        "peak_matrix_size": {name: n for name, (_, n) in peak.items()},
    }
    candidates = {"ours": model}
    if ReferenceTransformer.expresses(model.config):
        candidates["reference"] = ReferenceTransformer.like(model)
    else:
        print(
            "nn.Transformer cannot express heads of dim_k or dim_v other than d_model / n_heads: "
            "timing this model alone",
            file=sys.stderr,
        )
    print("preparing the models" + (" (compiling)" if args.compile else "") + " ...", file=sys.stderr)
    workloads = {
        name: Workload(candidate, data, device=device, bf16=precision.bf16, compiled=args.compile)
        for name, candidate in candidates.items()
    }
    print(f"timing them in turn, {args.rounds} rounds ...", file=sys.stderr)
    results.update(measure(workloads, rounds=args.rounds, seconds=args.seconds, latency_runs=args.latency_runs))
    print(report(results))
    right = sum(a == b for a, b in zip(results["ours"]["readings"], data[1]))
    if "reference" in results:
        agree = sum(a == b for a, b in zip(results["ours"]["readings"], results["reference"]["readings"]))
        print(f"\nthe two models read {agree} of the {args.batch_size} images alike; {right} of ours are right")
    else:
        print(f"\n{right} of the {args.batch_size} images read right")
    if device.type == "cpu":
        print("\ntargets (set for the 2-core development CPU):\n" + target_report(results))
    if args.json:
        try:
            with Staging() as staging:
                staging.file(args.json).write_text(json.dumps(results, indent=2) + "\n")
        except (OSError, ValueError) as error:
            print(f"error: cannot write {args.json}: {getattr(error, 'strerror', None) or error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
