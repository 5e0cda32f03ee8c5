import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from losses import TrainingLoss, teacher_probabilities
from model import (
    EOS,
    PAD,
    SOS,
    TOO_MANY,
    VOCAB_SIZE,
    Calibration,
    DecoderCache,
    DigitSequenceTransformer,
    ModelConfig,
    configure_optimizer,
    encode_labels,
    tokens_to_string,
    uint8_to_input,
)
from reader import TTA_SHIFTS, Ensemble, shift_images

CONFIG = ModelConfig(
    image_size=48,
    patch_size=8,
    stem_width=32,
    stem_depth=0,
    stem_full_res=0,
    d_model=32,
    n_heads=4,
    encoder_layers=2,
    decoder_layers=2,
    ff_mult=2,
    max_digits=4,
    patch_head=False,
)


@pytest.fixture
def model() -> DigitSequenceTransformer:
    torch.manual_seed(0)
    return DigitSequenceTransformer(CONFIG).eval()


def test_encode_labels_and_decode_round_trip():
    labels = ["", "7", "42", "0000", "9051"]
    inputs, targets = encode_labels(labels, max_digits=4)
    assert inputs.shape == targets.shape == (5, 5)
    assert inputs[2].tolist() == [SOS, 4, 2, PAD, PAD]
    assert targets[2].tolist() == [4, 2, EOS, PAD, PAD]
    assert targets[0].tolist() == [EOS, PAD, PAD, PAD, PAD]
    assert [tokens_to_string(t) for t in targets] == labels
    assert [tokens_to_string(t) for t in inputs] == list(labels)  # SOS is skipped, PAD ends


def test_a_label_longer_than_the_model_reads_is_its_first_digits_then_many():
    inputs, targets = encode_labels(["123456", "12345"], max_digits=4)
    assert inputs.tolist() == [[SOS, 1, 2, 3, 4]] * 2
    assert targets.tolist() == [[1, 2, 3, 4, TOO_MANY]] * 2
    assert tokens_to_string(targets[0]) == "1234"


@pytest.mark.parametrize("bad", ["4a", "-1", "٣", " 1"])
def test_encode_labels_rejects_bad_labels(bad):
    with pytest.raises(ValueError, match="digits"):
        encode_labels([bad], max_digits=4)


def test_forward_shapes_and_attention_maps(model):
    images = torch.rand(3, 1, 48, 48)
    inputs, _ = encode_labels(["1", "23", ""], max_digits=4)
    logits, attention = model(images, inputs, return_attention=True)
    assert logits.shape == (3, 5, VOCAB_SIZE)
    patches = (48 // 8) ** 2
    assert attention["encoder.0.self"].shape == (3, 4, patches, patches)
    assert attention["decoder.1.self"].shape == (3, 4, 5, 5)
    assert attention["decoder.1.cross"].shape == (3, 4, 5, patches)
    # Attention rows are distributions over the keys.
    torch.testing.assert_close(attention["decoder.0.cross"].sum(-1), torch.ones(3, 4, 5))
    # The written-out attention (used to return weights) computes the same as the fused kernel.
    torch.testing.assert_close(model(images, inputs), logits, atol=1e-5, rtol=1e-5)


def test_wrong_image_size_is_refused(model):
    with pytest.raises(AssertionError, match="48x48"):
        model(torch.rand(1, 1, 64, 64), torch.tensor([[SOS]]))


@pytest.mark.parametrize("return_attention", [False, True])
def test_causal_mask_hides_future_tokens(model, return_attention):
    images = torch.rand(2, 1, 48, 48)
    a, _ = encode_labels(["1234", "5"], max_digits=4)
    b = a.clone()
    b[:, 3:] = torch.tensor([7, 8])  # change only the tokens from position 3 on
    out_a = model(images, a, return_attention=return_attention)
    out_b = model(images, b, return_attention=return_attention)
    logits_a = out_a[0] if return_attention else out_a
    logits_b = out_b[0] if return_attention else out_b
    torch.testing.assert_close(logits_a[:, :3], logits_b[:, :3])  # earlier positions unchanged
    assert not torch.allclose(logits_a[:, 3:], logits_b[:, 3:])  # and the change does reach later ones


def test_decoding_one_token_at_a_time_with_a_cache_matches_the_whole_sequence_at_once(model):
    images = torch.rand(3, 1, 48, 48)
    inputs, _ = encode_labels(["1234", "56", ""], max_digits=4)
    memory = model.encode(images)
    whole = model.decode(memory, inputs)
    cache = DecoderCache(CONFIG.decoder_layers)
    stepwise = torch.cat(
        [model.decode(memory, inputs[:, t : t + 1], cache=cache) for t in range(inputs.shape[1])], dim=1
    )
    torch.testing.assert_close(stepwise, whole, atol=1e-5, rtol=1e-5)
    assert cache.length == 5 and cache.layers[1][0].keys.shape == (3, 4, 5, 8)  # one key per token per head
    prefix = DecoderCache(CONFIG.decoder_layers)
    torch.testing.assert_close(
        model.decode(memory, inputs[:, :2], cache=prefix), whole[:, :2]
    )  # a first prefix may go in whole
    with pytest.raises(AssertionError, match="one new token at a time"):
        model.decode(memory, inputs[:, 2:4], cache=prefix)


def test_greedy_decode_matches_teacher_forcing_on_its_own_output(model):
    torch.manual_seed(1)
    images = torch.rand(6, 1, 48, 48)
    decoded = model.greedy_decode(model.encode(images))
    assert decoded.tokens.shape == decoded.token_probs.shape
    assert decoded.tokens.shape[1] <= CONFIG.max_digits + 1
    for row, text, too_many in zip(decoded.tokens, decoded.strings(), decoded.too_many()):
        assert len(text) <= CONFIG.max_digits
        assert (EOS in row.tolist()) != too_many  # every sequence ends, in EOS or in TOO_MANY
        assert not too_many or len(text) == CONFIG.max_digits  # TOO_MANY only after max_digits digits
    # Feeding the decoded digits back with teacher forcing gives the same choice at each step
    # (among the tokens decoding may choose) and the same probabilities.
    labels = [text + "0" * too_many for text, too_many in zip(decoded.strings(), decoded.too_many())]
    inputs, targets = encode_labels(labels, CONFIG.max_digits)
    log_probs = model(images, inputs).log_softmax(-1)
    for i in range(len(labels)):
        for t, token in enumerate(targets[i][targets[i] != PAD].tolist()):
            allowed = log_probs[i, t].clone()
            allowed[[SOS, PAD]] = float("-inf")
            if t == CONFIG.max_digits:
                allowed[:EOS] = float("-inf")
            else:
                allowed[TOO_MANY] = float("-inf")
            assert allowed.argmax().item() == token
            assert abs(F.softmax(allowed, -1)[token].item() - decoded.token_probs[i, t].item()) < 1e-4


def test_a_model_that_always_says_many_reads_max_digits_digits_then_says_so(model):
    # Every logit but TOO_MANY's and one digit's pushed down: decoding may only emit TOO_MANY where it is
    # allowed, after max_digits digits.
    with torch.no_grad():
        model.head.bias.fill_(-50.0)
        model.head.bias[TOO_MANY] = 50.0
        model.head.bias[7] = 40.0
    decoded = model.read(torch.zeros(2, 48, 48, dtype=torch.uint8))
    assert decoded.strings() == ["7777", "7777"] and decoded.too_many() == [True, True]
    beams = model.read(torch.zeros(1, 48, 48, dtype=torch.uint8), beam_size=3).beams[0]
    assert beams[0][:2] == ("7777", True) and len({b[0] for b in beams}) == len(beams) <= 3


def test_temperature_keeps_the_reading_and_changes_only_its_confidence(model):
    torch.manual_seed(3)
    images = (torch.rand(6, 48, 48) * 255).to(torch.uint8)
    plain = model.read(images)
    model.calibration = Calibration(temperature=3.0)
    softened = model.read(images)
    assert softened.strings() == plain.strings() and softened.too_many() == plain.too_many()
    assert not torch.allclose(softened.confidence(), plain.confidence())
    with pytest.raises(ValueError, match="temperature"):
        Calibration(temperature=float("nan"))
    with pytest.raises(ValueError, match="min_confidence"):
        Calibration(min_confidence=1.5)


def test_beam_search_width_one_is_greedy_and_wider_beams_score_at_least_as_well(model):
    torch.manual_seed(2)
    images = torch.rand(8, 1, 48, 48)
    memory = model.encode(images)
    greedy = model.greedy_decode(memory)
    assert model.beam_search(memory, beam_size=1).strings() == greedy.strings()
    beam = model.beam_search(memory, beam_size=5)
    # Beam search keeps greedy's path unless 5 better ones crowd it out, so its answer is at
    # least as probable as greedy's.
    assert (beam.token_probs.log().sum(1) >= greedy.token_probs.log().sum(1) - 1e-5).all()
    # Its alternatives are distinct readings, most probable first, the first being its answer.
    for options, digits, confidence in zip(beam.beams, beam.strings(), beam.confidence().tolist()):
        probs = [p for _, _, p in options]
        assert probs == sorted(probs, reverse=True) and len({(d, m) for d, m, _ in options}) == len(options)
        assert options[0][0] == digits and abs(options[0][2] - confidence) < 1e-4
    with pytest.raises(ValueError):
        model.beam_search(memory, beam_size=0)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(image_size=96, patch_size=7)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelConfig(d_model=30, n_heads=4)


def test_optimizer_decays_matrices_only(model):
    optimizer = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "stem, patch_size, full_res, half_res",
    [
        ("conv", 8, 0, 0),
        ("conv", 12, 0, 0),
        ("conv", 12, 4, 0),
        ("conv", 12, 4, 2),
        ("conv", 16, 0, 1),
        ("linear", 12, 0, 0),
    ],
)
def test_both_stems_make_one_vector_per_patch(stem, patch_size, full_res, half_res):
    config = ModelConfig(
        image_size=96,
        patch_size=patch_size,
        stem=stem,
        stem_full_res=full_res,
        stem_half_res=half_res,
        d_model=32,
        n_heads=2,
        encoder_layers=1,
        decoder_layers=1,
        ff_mult=2,
    )
    model = DigitSequenceTransformer(config).eval()
    assert model.encode(torch.rand(2, 1, 96, 96)).shape == (2, (96 // patch_size) ** 2, 32)
    if stem == "conv":  # half_res adds convolutions of the half-resolution width, stride 1
        convs = [m for m in model.patch_embed.convs if isinstance(m, torch.nn.Conv2d)]
        half = config.stem_width // 2
        assert sum(c.stride == (1, 1) and c.in_channels == c.out_channels == half for c in convs) == half_res


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(stem="resnet"), "stem"),
        (dict(stem="conv", patch_size=6, image_size=48), "multiple of 4"),
        (dict(stem_width=3), "stem_width"),
        (dict(stem_full_res=-8), "stem_full_res"),
        (dict(stem_half_res=9), "stem_half_res"),
    ],
)
def test_config_rejects_impossible_stems(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**settings)


def test_order_free_loss_takes_the_cheapest_ordering_of_each_label(model):
    from losses import order_free_loss, sequence_losses

    images = torch.rand(3, 1, 48, 48)  # the model is in eval mode: no dropout, so every decode is comparable
    labels = ["12", "7", "335"]
    memory = model.encode(images)
    loss = order_free_loss(model, memory, labels)

    def fixed_order(orders: list[str]) -> torch.Tensor:
        inputs, targets = encode_labels(orders, max_digits=4)
        return sequence_losses(model.decode(memory, inputs), targets)

    # By hand: every ordering of every label, the minimum per image, averaged over the 2+1+3+3 tokens.
    candidates = [fixed_order([a, "7", b]) for a in ("12", "21") for b in ("335", "353", "533")]
    expected = torch.stack(candidates).min(dim=0).values.sum() / 9
    assert torch.allclose(loss, expected)
    assert loss <= fixed_order(labels).sum() / 9 + 1e-6  # never dearer than the given order
    loss.backward()  # the minimum passes gradients to the chosen ordering's tokens and to the encoder
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_order_free_loss_keeps_the_order_of_a_label_longer_than_the_model_reads(model):
    from losses import order_free_loss, sequence_losses

    images = torch.rand(2, 1, 48, 48)
    memory = model.encode(images)
    labels = ["654321", "12"]
    inputs, targets = encode_labels(["654321"], max_digits=4)
    overflow = sequence_losses(model.decode(memory[:1], inputs), targets)
    others = min(
        sequence_losses(model.decode(memory[1:], encode_labels([o], 4)[0]), encode_labels([o], 4)[1])
        for o in ("12", "21")
    )
    # 4 digits + TOO_MANY, and 2 digits + EOS.
    assert torch.allclose(order_free_loss(model, memory, labels), (overflow + others).sum() / 8)


def test_patch_targets_mark_the_digit_under_each_patch():
    from losses import IGNORE, patch_targets
    from model import NO_DIGIT

    # 48x48 image, 8x8 patches (6x6 grid). A "7" fills patches (1, 1)-(2, 2) exactly; a thin "1"
    # is 3 px wide inside patch (4, 4), where no patch centre falls; the second image is blank.
    boxes = torch.tensor([[[8, 8, 24, 24], [34, 33, 37, 40], [-1, -1, -1, -1]], [[-1, -1, -1, -1]] * 3])
    targets = patch_targets(boxes, ["71", ""], image_size=48, patch_size=8).view(2, 6, 6)
    expected = torch.full((6, 6), NO_DIGIT)
    expected[1:3, 1:3] = 7
    expected[4, 4] = 1  # holds the box centre
    assert torch.equal(targets[0], expected)
    assert (targets[1] == NO_DIGIT).all()
    # A patch the box only grazes is not taught as either answer.
    grazed = patch_targets(torch.tensor([[[8, 8, 20, 20]]]), ["3"], image_size=48, patch_size=8).view(6, 6)
    assert grazed[1, 1] == 3 and grazed[2, 2] == IGNORE and grazed[1, 2] == IGNORE and grazed[3, 3] == NO_DIGIT


def test_patch_head_classifies_every_patch():
    config = ModelConfig(**{**CONFIG.__dict__, "patch_head": True})
    model = DigitSequenceTransformer(config)
    assert DigitSequenceTransformer(CONFIG).patch_head is None  # no head, no parameters for it
    memory = model.encode(torch.rand(2, 1, 48, 48))
    assert model.patch_head(memory).shape == (2, 36, 11)


def test_read_is_greedy_decoding_of_uint8_canvases_with_attention_per_token(model):
    torch.manual_seed(3)
    canvases = (torch.rand(5, 48, 48) * 255).to(torch.uint8)
    decoded = model.read(canvases, attention=True)
    pixels = canvases[:, None].float() / 255
    assert decoded.strings() == model.greedy_decode(model.encode(pixels)).strings()
    assert model.read(canvases, beam_size=3).strings() == model.beam_search(model.encode(pixels), 3).strings()
    grid = CONFIG.grid_size
    assert decoded.attention.shape == (5, decoded.tokens.shape[1], grid, grid)
    torch.testing.assert_close(decoded.attention.amax(dim=(2, 3)), torch.ones(5, decoded.tokens.shape[1]))
    # Each token's map is the cross-attention of the step that emitted it, averaged over heads and layers.
    inputs = torch.cat([torch.full((5, 1), SOS), decoded.tokens[:, :-1]], dim=1)
    _, weights = model(pixels, inputs, return_attention=True)
    cross = torch.stack([weights[f"decoder.{i}.cross"] for i in range(CONFIG.decoder_layers)]).mean(dim=(0, 2))
    expected = (cross / cross.amax(-1, keepdim=True)).view(5, -1, grid, grid)
    torch.testing.assert_close(decoded.attention, expected)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_digits=10**7), "max_digits must be between 1 and 32"),
        (dict(image_size=9600), "image_size must be between"),
        (dict(d_model=128.0), "d_model must be int"),
        (dict(dropout=float("nan")), "dropout must hold finite numbers"),
        (dict(patch_head="yes"), "patch_head must be bool"),
        (dict(image_size=1024, patch_size=4, stem="linear"), "256x256 patches: at most 64x64"),
    ],
)
def test_config_bounds_are_checked_before_anything_is_built(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**settings)


def test_checkpoints_round_trip_and_refuse_what_is_not_ours(model, tmp_path):
    from checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint

    path = tmp_path / "m.pt"
    save_checkpoint(path, CONFIG, model.state_dict(), step=7)
    loaded = load_model(path, "cpu")
    assert loaded.config == CONFIG and not loaded.training and load_checkpoint(path)["step"] == 7
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind

    def refused(content: dict | bytes, message: str) -> None:
        bad = tmp_path / "bad.pt"
        bad.write_bytes(content) if isinstance(content, bytes) else torch.save(content, bad)
        with pytest.raises(CheckpointError, match=message) as refusal:
            load_model(bad, "cpu")
        assert "\n" not in str(refusal.value)  # one line, whatever torch had to say

    good = torch.load(path, weights_only=True)
    refused(b"not a checkpoint", "is not a digit-sequence checkpoint")
    refused(path.read_bytes()[:3000], "is not a digit-sequence checkpoint")  # cut short
    refused({"config": good["model_config"], "model": good["model"]}, "has no version")  # an older layout
    refused(
        {**good, "model_config": {**good["model_config"], "max_digits": 10**7}}, "max_digits must be between 1 and 32"
    )
    refused({**good, "model_config": {**good["model_config"], "colour": "red"}}, "not model settings: colour")
    refused({**good, "model_config": {**good["model_config"], "d_model": 64}}, "do not fit its model_config")
    poisoned = {k: v.clone() for k, v in good["model"].items()}
    poisoned["head.bias"][0] = float("nan")
    refused({**good, "model": poisoned}, "NaN or infinite: the run that wrote it diverged")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path / "missing.pt", "cpu")


def test_a_failed_save_leaves_the_previous_checkpoint_whole(model, tmp_path):
    from checkpoint import load_model, save_checkpoint

    path = tmp_path / "m.pt"
    save_checkpoint(path, CONFIG, model.state_dict())
    before = path.read_bytes()
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):  # a lambda cannot be pickled
        save_checkpoint(path, CONFIG, model.state_dict(), unpicklable=lambda: None)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    load_model(path, "cpu")


def test_a_checkpoint_gets_the_permissions_open_would_give(model, tmp_path):
    from checkpoint import save_checkpoint

    previous = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "m.pt", CONFIG, model.state_dict())
        (tmp_path / "made-by-open").write_text("x")
    finally:
        os.umask(previous)
    mode = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert mode == {"m.pt": 0o640, "made-by-open": 0o640}, "readable by the group as any file, and nothing left over"


def test_attention_widths_dim_k_and_dim_v_shape_the_projections_and_decode_alike():
    narrow = ModelConfig(**{**CONFIG.__dict__, "dim_k": 8, "dim_v": 24})  # d_model 32, 4 heads: 8 would be the default
    torch.manual_seed(4)
    model = DigitSequenceTransformer(narrow).eval()
    attention = model.decoder[0].cross_attn
    assert attention.query.weight.shape == (4 * 8, 32) and attention.key_value.weight.shape == (4 * (8 + 24), 32)
    assert attention.out.weight.shape == (32, 4 * 24)
    per_attention_change = (4 * 8 * 33 + 4 * 32 * 33 + 32 * (4 * 24 + 1)) - (32 * 33 + 64 * 33 + 32 * 33)
    attentions = CONFIG.encoder_layers + 2 * CONFIG.decoder_layers
    default = DigitSequenceTransformer(CONFIG).num_parameters()
    assert model.num_parameters() == default + attentions * per_attention_change
    images = torch.rand(3, 1, 48, 48)
    inputs, _ = encode_labels(["1234", "56", ""], max_digits=4)
    memory = model.encode(images)
    whole = model.decode(memory, inputs)
    assert whole.shape == (3, 5, VOCAB_SIZE)
    cache = DecoderCache(narrow.decoder_layers)
    stepwise = torch.cat([model.decode(memory, inputs[:, t : t + 1], cache=cache) for t in range(5)], dim=1)
    torch.testing.assert_close(stepwise, whole, atol=1e-5, rtol=1e-5)
    self_cache, cross_cache = cache.layers[0]
    assert self_cache.keys.shape == (3, 4, 5, 8) and self_cache.values.shape == (3, 4, 5, 24)
    assert cross_cache.keys.shape == (3, 4, 36, 8)
    logits, weights = model(images, inputs, return_attention=True)  # the written-out attention agrees too
    torch.testing.assert_close(logits, whole, atol=1e-5, rtol=1e-5)
    assert weights["decoder.0.cross"].shape == (3, 4, 5, 36)


def test_a_checkpoint_saved_without_dim_k_and_dim_v_loads_and_reads_as_before(model, tmp_path):
    from checkpoint import load_model, save_checkpoint

    save_checkpoint(tmp_path / "old.pt", CONFIG, model.state_dict())
    checkpoint = torch.load(tmp_path / "old.pt", weights_only=True)
    for name in ("dim_k", "dim_v"):  # as checkpoints written before the fields existed
        del checkpoint["model_config"][name]
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt", "cpu", precision="fp32")  # as the fixture reads: bf16 rounds otherwise
    assert loaded.config.head_dim_k == loaded.config.head_dim_v == CONFIG.d_model // CONFIG.n_heads
    canvases = (torch.rand(6, 48, 48) * 255).to(torch.uint8)
    before, after = model.read(canvases), loaded.read(canvases)
    assert after.strings() == before.strings() and torch.equal(after.token_probs, before.token_probs)


def test_shift_images_moves_the_ink_and_fills_with_black():
    images = torch.zeros(1, 6, 6, dtype=torch.uint8)
    images[0, 2, 3] = 200
    moved = shift_images(images, 2, -1)
    assert moved[0, 1, 5] == 200 and moved.sum() == 200
    assert shift_images(images, 4, 0).sum() == 0  # moved off the canvas: gone, not wrapped round


def test_an_ensemble_reads_like_its_model_alone_or_twice_and_tta_reads_every_image(model):
    images = (torch.rand(5, CONFIG.image_size, CONFIG.image_size) * 255).to(torch.uint8)
    alone = model.read(images)
    for ensemble in (Ensemble([model]), Ensemble([model, model])):
        read = ensemble.read(images)
        assert torch.equal(read.tokens, alone.tokens) and torch.allclose(read.token_probs, alone.token_probs)
    tta = Ensemble([model], TTA_SHIFTS).read(images)
    assert tta.tokens.shape[0] == 5 and ((tta.token_probs > 0) & (tta.token_probs <= 1)).all()
    looked = Ensemble([model], TTA_SHIFTS).read(images, attention=True)  # the same reading, and where it looked
    assert torch.equal(looked.tokens, tta.tokens) and torch.equal(looked.token_probs, tta.token_probs)
    assert looked.attention.shape[:2] == tta.tokens.shape
    other = DigitSequenceTransformer(ModelConfig(**{**CONFIG.__dict__, "max_digits": 3}))
    with pytest.raises(ValueError, match="same canvas size and number of digits"):
        Ensemble([model, other])


def test_an_ensemble_rescores_beam_candidates_as_it_reads_them(model):
    images = (torch.rand(4, CONFIG.image_size, CONFIG.image_size) * 255).to(torch.uint8)
    alone = model.read(images, beam_size=3).beams
    twice = Ensemble([model, model]).read(images, beam_size=3).beams
    for options, again in zip(alone, twice):  # the same model twice: the same probabilities
        assert [o[:2] for o in options] == [o[:2] for o in again]
        assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(options, again))
    tta = Ensemble([model], TTA_SHIFTS)
    read = tta.read(images)
    for i, (digits, too_many, confidence) in enumerate(zip(read.strings(), read.too_many(), read.confidence())):
        [[(_, _, rescored)]] = tta.rescored(images[i : i + 1], [[(digits, too_many, 0.0)]])
        assert abs(rescored - confidence.item()) < 1e-4  # an alternative that is the reading has its confidence


def test_distilling_matches_the_teachers_probabilities_where_there_are_tokens(model):
    images = torch.randint(0, 256, (3, CONFIG.image_size, CONFIG.image_size), dtype=torch.uint8)
    inputs, targets = encode_labels(["12", "", "3456"], CONFIG.max_digits)
    pixels = uint8_to_input(images)
    losses = {
        w: TrainingLoss(model, label_smoothing=0.0, patch_loss_weight=0.0, order_free=False, distill_weight=w)
        for w in (0.0, 0.5, 1.0)
    }
    label_loss = losses[0.0](pixels, inputs, targets, None)
    # A teacher sure of every label teaches what the labels do.
    sure = F.one_hot(targets, VOCAB_SIZE).float()
    assert torch.allclose(losses[1.0](pixels, inputs, targets, None, None, sure), label_loss)
    # Another teacher: the loss mixes the two, and what it says after <eos> (PAD targets) counts for nothing.
    teacher = DigitSequenceTransformer(CONFIG).eval()
    probs = teacher_probabilities([teacher], pixels, inputs)
    assert probs.shape == (*targets.shape, VOCAB_SIZE) and torch.allclose(probs.sum(-1), torch.ones(targets.shape))
    soft = losses[1.0](pixels, inputs, targets, None, None, probs)
    assert torch.allclose(losses[0.5](pixels, inputs, targets, None, None, probs), (label_loss + soft) / 2)
    after_eos = probs.clone()
    after_eos[targets == PAD] = 1 / VOCAB_SIZE
    assert torch.allclose(losses[1.0](pixels, inputs, targets, None, None, after_eos), soft)
    # Two teachers: their probabilities averaged.
    both = teacher_probabilities([teacher, model], pixels, inputs)
    assert torch.allclose(both, (probs + teacher_probabilities([model], pixels, inputs)) / 2)
