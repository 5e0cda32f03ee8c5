"""bench.py: the nn.Transformer reference is the same function as our model, and one short run
prints the comparison table and writes its numbers."""

import json
import re

import pytest
import torch

from bench import ReferenceTransformer, main
from checkpoint import DEFAULT_CHECKPOINT, load_model
from model import DigitSequenceTransformer, ModelConfig, encode_labels

CONFIG = ModelConfig(
    image_size=48,
    patch_size=8,
    stem_depth=1,
    stem_width=16,
    stem_full_res=4,
    d_model=32,
    n_heads=4,
    encoder_layers=2,
    decoder_layers=2,
    ff_mult=2,
    dropout=0.0,
    patch_head=True,
)


def test_the_reference_built_from_nn_transformer_computes_what_our_model_does():
    torch.manual_seed(0)
    ours = DigitSequenceTransformer(CONFIG)
    reference = ReferenceTransformer.like(ours)
    assert reference.num_parameters() == ours.num_parameters()
    images = torch.rand(4, 1, 48, 48)
    inputs, _ = encode_labels(["1234", "56", "", "7"], max_digits=4)
    for training in (True, False):  # nn.Transformer takes another path (its fused kernels) in eval mode
        ours.train(training), reference.train(training)
        with torch.no_grad():
            torch.testing.assert_close(reference(images, inputs), ours(images, inputs), atol=1e-5, rtol=1e-5)
    # Greedy decoding re-reads the whole prefix in the reference and uses the cache in ours.
    canvases = (images[:, 0] * 255).round().to(torch.uint8)
    ours_read, reference_read = ours.read(canvases), reference.read(canvases)
    assert reference_read.strings() == ours_read.strings()
    torch.testing.assert_close(reference_read.token_probs, ours_read.token_probs, atol=1e-5, rtol=1e-5)


# Each precision forced, whatever auto would pick on this machine; bf16 on the tiny model, as a CPU
# without bf16 arithmetic emulates it far too slowly for the shipped one in a test.
@pytest.mark.parametrize("precision, other", [("fp32", "bf16"), ("bf16", "fp32")])
def test_a_short_run_prints_the_comparison_and_writes_json(tmp_path, mnist_root, tiny_run, capsys, precision, other):
    out = tmp_path / "bench.json"
    checkpoint = DEFAULT_CHECKPOINT if precision == "fp32" else tiny_run / "model.pt"
    short = "--device cpu --batch-size 8 --seconds 0.2 --latency-runs 4 --rounds 1".split()
    paths = ["--mnist-root", str(mnist_root), "--checkpoint", str(checkpoint), "--json", str(out)]
    assert main([*short, *paths, "--precision", precision]) == 0
    printed = capsys.readouterr().out
    for row in (
        "training img/s",
        "inference img/s (greedy, batch 8)",
        "latency p50",
        "latency p95",
        "training GFLOP/image",
        f"training MFU, of the {precision} peak (the precision used)",
        f"inference MFU, of the {other} peak |",
    ):
        assert f"| {row}" in printed
    agree = int(re.search(r"the two models read (\d) of the 8 images alike", printed)[1])
    assert agree == 8 or (precision == "bf16" and agree >= 6)  # bf16 rounding may tip a close call
    assert "targets (set for the 2-core development CPU)" in printed
    results = json.loads(out.read_text())
    ours, reference = results["ours"], results["reference"]
    assert results["precision"] == precision and results["peak_flops_per_second"]["fp32"] > 0
    assert ours["parameters"] == reference["parameters"] == load_model(checkpoint, "cpu").num_parameters()
    # Same layers, so the same training work; the reference re-reads the prefix when decoding.
    assert ours["training_flops_per_image"] == pytest.approx(reference["training_flops_per_image"])
    assert ours["inference_flops_per_image"] < reference["inference_flops_per_image"]
    # Backward costs about twice the forward, so training is about 3x the encoder's work.
    assert 2.5 < ours["training_flops_per_image"] / ours["inference_flops_per_image"] < 3.5
    assert ours["training_images_per_second"] > 0 and ours["latency_p95_ms"] >= ours["latency_p50_ms"] > 0


def test_absurd_arguments_and_a_missing_checkpoint_are_refused(capsys, tmp_path):
    for size in ("0", "100000000"):
        with pytest.raises(SystemExit):
            main(["--batch-size", size])
        assert "--batch-size must be 1 to 4096" in capsys.readouterr().err
    for unwritable in (str(tmp_path), "", "/proc/no-such-folder/bench.json"):  # refused before the benchmark
        with pytest.raises(SystemExit):
            main(["--json", unwritable])
        assert "--json: " in capsys.readouterr().err
    assert main(["--checkpoint", "missing.pt"]) == 2
    assert "error: no checkpoint at missing.pt" in capsys.readouterr().err


def test_a_model_nn_transformer_cannot_express_is_timed_alone(tmp_path, mnist_root, capsys):
    from checkpoint import save_checkpoint

    config = ModelConfig(**{**CONFIG.__dict__, "image_size": 96, "patch_size": 12, "dim_k": 4})
    assert ReferenceTransformer.expresses(CONFIG) and not ReferenceTransformer.expresses(config)
    save_checkpoint(tmp_path / "narrow.pt", config, DigitSequenceTransformer(config).state_dict())
    short = "--device cpu --batch-size 4 --seconds 0.1 --latency-runs 2 --rounds 1 --precision fp32".split()
    assert main([*short, "--mnist-root", str(mnist_root), "--checkpoint", str(tmp_path / "narrow.pt")]) == 0
    out, err = capsys.readouterr()
    assert "nn.Transformer cannot express heads of dim_k or dim_v" in err
    assert "| training img/s |" in out and "| - | - |" in out and "no reference for this model" in out
