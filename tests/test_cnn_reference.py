import json

import pytest
import torch

from cnn_reference import main, misread_digits, one_cycle, plain_cnn, random_affine, standardise


def test_the_reference_is_the_plain_cnn_the_comparison_names():
    cnn = plain_cnn()
    convs = [m for m in cnn if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128] and all(c.kernel_size == (3, 3) for c in convs)
    assert 130_000 < sum(p.numel() for p in cnn.parameters()) < 150_000
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_the_schedule_rises_then_falls_within_the_budget():
    rates = [one_cycle(share / 100, 3e-3) for share in range(101)]
    top = max(range(101), key=rates.__getitem__)
    assert 20 <= top <= 30 and abs(rates[top] - 3e-3) < 1e-4
    assert rates[0] < 3e-4 and rates[-1] < 1e-5
    rising, falling = rates[: top + 1], rates[top:]
    assert rising == sorted(rising) and falling == sorted(falling, reverse=True)


def test_augmentation_moves_ink_but_keeps_it():
    digit = torch.zeros(64, 1, 28, 28)
    digit[:, :, 6:22, 12:16] = 1.0  # a "1"
    moved = random_affine(digit, torch.Generator().manual_seed(0))
    assert moved.shape == digit.shape and not torch.equal(moved, digit)
    ink = moved.sum(dim=(1, 2, 3)) / digit.sum(dim=(1, 2, 3))
    assert ((ink > 0.75) & (ink < 1.3)).all(), "scaled by 0.9-1.1, nothing cut off"


def test_a_short_training_reads_most_digits(tmp_path, mnist_root, mnist_test, capsys):
    out, weights = tmp_path / "reports" / "cnn.json", tmp_path / "cnn.pt"
    flags = ["--steps", "80", "--batch-size", "32", "--out", str(out), "--save", str(weights)]
    assert main([*flags, "--mnist-root", str(mnist_root)]) == 0
    record = json.loads(out.read_text())
    assert record["test_digits"] == 10_000 and record["steps"] == 80 and record["digits_seen"] == 80 * 32
    assert record["misread"] == len(record["errors"]) and record["digit_error"] < 0.25, "80 steps read most digits"
    assert all(true != read for _, true, read in record["errors"])
    assert f"{record['misread']} of 10000" in capsys.readouterr().out
    cnn = plain_cnn()
    cnn.load_state_dict(torch.load(weights, weights_only=True))
    images, labels = (a[:2000] for a in mnist_test)
    errors = misread_digits(cnn, standardise(images), torch.from_numpy(labels).long())
    assert errors == [tuple(e) for e in record["errors"] if e[0] < 2000], "the saved weights are the ones scored"


BAD_FLAGS = [
    ["--minutes", "0"],
    ["--steps", "-1"],
    ["--batch-size", "0"],
    ["--lr", "0"],  # each bound names its own flag
    ["--weight-decay", "11"],
    ["--out", "."],
    ["--save", "."],
    ["--seed", "99999999999999999999999"],
    ["--seed", "-1"],
    ["--out", "/proc/no-such-folder/result.json"],  # a folder that takes no files: refused before training
    ["--out", "same.json", "--save", "same.json"],  # the weights would overwrite the result
]


@pytest.mark.parametrize("flags", BAD_FLAGS)
def test_bad_flags_stop_before_any_training(flags, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(flags)
    assert stopped.value.code == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and f"error: {flags[0]}" in said[0], "one line naming the flag"
