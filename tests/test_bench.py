"""bench.py: the nn.Transformer reference is the same function as our model, and one short run
prints the comparison table and writes its numbers."""

import json

import pytest
import torch

from bench import ReferenceTransformer, main
from model import DigitSequenceTransformer, ModelConfig, encode_labels

CONFIG = ModelConfig(image_size=48, patch_size=8, stem_depth=1, stem_width=16, stem_full_res=4, d_model=32, n_heads=4,
                     encoder_layers=2, decoder_layers=2, ff_mult=2, dropout=0.0, patch_head=True)


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
    ours_read, reference_read = ours.greedy_decode(images), reference.greedy_decode(images)
    assert reference_read.strings() == ours_read.strings()
    torch.testing.assert_close(reference_read.token_probs, ours_read.token_probs, atol=1e-5, rtol=1e-5)


def test_a_short_run_prints_the_comparison_and_writes_json(tmp_path, mnist_root, capsys):
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--mnist-root", str(mnist_root), "--batch-size", "8", "--seconds", "0.2",
                 "--latency-runs", "4", "--rounds", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("training img/s", "inference img/s (greedy, batch 8)", "latency p50", "latency p95",
                "training GFLOP/image", "training MFU, of the fp32 peak (the precision used)", "inference MFU, of the bf16 peak"):
        assert f"| {row}" in printed
    assert "the two models read 8 of the 8 images alike" in printed
    assert "targets (set for the 2-core development CPU)" in printed
    results = json.loads(out.read_text())
    ours, reference = results["ours"], results["reference"]
    assert results["precision"] == "fp32" and results["peak_flops_per_second"]["fp32"] > 0
    assert ours["parameters"] == reference["parameters"] == 1_426_096  # the shipped model's size
    # Same layers, so the same training work; the reference re-reads the prefix when decoding.
    assert ours["training_flops_per_image"] == pytest.approx(reference["training_flops_per_image"])
    assert ours["inference_flops_per_image"] < reference["inference_flops_per_image"]
    # Backward costs about twice the forward, so training is about 3x the encoder's work.
    assert 2.5 < ours["training_flops_per_image"] / ours["inference_flops_per_image"] < 3.5
    assert ours["training_images_per_second"] > 0 and ours["latency_p95_ms"] >= ours["latency_p50_ms"] > 0


def test_absurd_arguments_and_a_missing_checkpoint_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--batch-size", "0"])
    assert "--batch-size >= 1" in capsys.readouterr().err
    assert main(["--checkpoint", "missing.pt"]) == 2
    assert "error: no checkpoint at missing.pt" in capsys.readouterr().err
