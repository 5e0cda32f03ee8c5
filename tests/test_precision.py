import json
from collections.abc import Callable

import pytest
import torch
from test_model import CONFIG

import precision as precision_module
from model import DigitSequenceTransformer
from precision import PRECISION_JOBS, Precision, choose_precision, pick_device, precision_cache_file


@pytest.fixture
def model() -> DigitSequenceTransformer:
    torch.manual_seed(0)
    return DigitSequenceTransformer(CONFIG).eval()


def test_pick_device_takes_what_the_machine_has_and_explains_what_it_lacks():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu0': expected auto, cpu, cuda, cuda:N or mps"):
        pick_device("tpu0")
    with pytest.raises(
        ValueError,
        match=f"device 'cuda:{torch.cuda.device_count()}': PyTorch sees {torch.cuda.device_count()} CUDA GPU",
    ):
        pick_device(f"cuda:{torch.cuda.device_count()}")


def fake_timing(seconds: Callable[[Precision], float], cpu_share: Callable[[Precision], float] | None = None):
    """A stand-in for precision.time_job: (seconds per run, cores busy) as a function of the precision timed."""
    return lambda work, precision, device, runs: (seconds(precision), (cpu_share or (lambda p: p.threads))(precision))


@pytest.mark.parametrize("bf16_seconds, picked", [(0.5, True), (0.85, True), (0.95, False), (2.0, False)])
def test_auto_precision_takes_bf16_only_where_the_job_was_timed_faster(
    model, monkeypatch, tmp_path, bf16_seconds, picked
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(precision_module, "bf16_product_slowdown", lambda device: 1.0)  # a CPU with bf16 arithmetic
    monkeypatch.setattr(precision_module, "time_job", fake_timing(lambda p: bf16_seconds if p.bf16 else 1.0))
    chosen = choose_precision("auto", model, "train", probe_threads=False)
    assert chosen.bf16 is picked and chosen.why.startswith("bf16" if picked else "fp32")
    assert "train" in chosen.why  # the log says which job was timed


def test_one_lucky_round_does_not_decide_the_precision(model, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(precision_module, "bf16_product_slowdown", lambda device: 1.0)
    bf16_rounds = iter([0.5, 1.0, 1.0, 1.0, 1.0])  # the machine was quiet for one bf16 timing only
    monkeypatch.setattr(precision_module, "time_job", fake_timing(lambda p: next(bf16_rounds) if p.bf16 else 1.0))
    chosen = choose_precision("auto", model, "train", probe_threads=False)
    assert not chosen.bf16 and "1.00x" in chosen.why and "0.50-1.00" in chosen.why


def test_the_choice_is_cached_per_job_and_a_damaged_cache_is_timed_again(model, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(precision_module, "bf16_product_slowdown", lambda device: 1.0)
    monkeypatch.setattr(precision_module, "time_job", fake_timing(lambda p: 0.5 if p.bf16 else 1.0))
    assert choose_precision("auto", model, "read_batch", probe_threads=False).bf16

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again although the choice was cached")

    monkeypatch.setattr(precision_module, "time_job", no_timing)
    again = choose_precision("auto", model, "read_batch", probe_threads=False)
    assert again.bf16 and "cached" in again.why
    with pytest.raises(AssertionError, match="timed again"):  # another job is timed for itself
        choose_precision("auto", model, "read_one", probe_threads=False)
    assert choose_precision("fp32", model, "read_one", probe_threads=False) == Precision(
        False, again.threads, "fp32, as asked"
    )
    precision_cache_file().write_text("{not json")
    monkeypatch.setattr(precision_module, "time_job", fake_timing(lambda p: 2.0 if p.bf16 else 1.0))
    assert not choose_precision("auto", model, "read_batch", probe_threads=False).bf16


def test_a_full_disk_keeps_the_precision_cache_as_it_was_and_leaves_no_partial_file(model, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(precision_module, "bf16_product_slowdown", lambda device: 1.0)
    monkeypatch.setattr(precision_module, "time_job", fake_timing(lambda p: 1.0 if p.bf16 else 2.0))
    choose_precision("auto", model, "read_batch", probe_threads=False)
    cache = precision_cache_file()
    before = cache.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(precision_module.json, "dump", full_disk)
    assert choose_precision("auto", model, "read_one", probe_threads=False).bf16  # the choice stands, uncached
    assert cache.read_bytes() == before
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]


def test_slow_bf16_products_rule_bf16_out_without_timing_the_job(model, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(
        precision_module, "bf16_product_slowdown", lambda device: 40.0
    )  # an AVX2-only CPU emulates bf16
    monkeypatch.setattr(precision_module, "probe_work", lambda *args: pytest.fail("the job was timed"))
    chosen = choose_precision("auto", model, "train", probe_threads=False)
    assert not chosen.bf16 and "40x" in chosen.why


def test_a_busy_cpu_runs_the_job_on_the_thread_count_timed_fastest(model, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(
        precision_module, "time_job", fake_timing(lambda p: {1: 1.0}.get(p.threads, 3.0), lambda p: 1.0)
    )
    try:
        torch.set_num_threads(2)
        busy = choose_precision("fp32", model, "train")  # two threads get one core's time between them
        assert busy.threads == 1 and torch.get_num_threads() == 1 and "busy" in busy.why
        torch.set_num_threads(2)
        monkeypatch.setattr(precision_module, "time_job", fake_timing(lambda p: 1.0))  # each thread a core of its own
        assert choose_precision("fp32", model, "train").threads == 2
    finally:
        torch.set_num_threads(threads)


def test_a_real_probe_picks_a_precision_reads_in_it_and_leaves_the_model_as_it_was(model, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for job in PRECISION_JOBS:
        chosen = choose_precision("auto", model, job, probe_threads=False)
        assert isinstance(chosen.bf16, bool) and chosen.why
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert len(json.loads(precision_cache_file().read_text())) == len(PRECISION_JOBS)
    autocast_seen = []
    encode = model.encode
    monkeypatch.setattr(
        model, "encode", lambda x, **kw: autocast_seen.append(torch.is_autocast_enabled("cpu")) or encode(x, **kw)
    )
    images = torch.zeros(2, CONFIG.image_size, CONFIG.image_size, dtype=torch.uint8)
    model.read(images)
    model.read_bf16["read_batch"] = True
    model.read(images)
    model.read(images[:1])
    assert autocast_seen == [False, True, False]  # a batch now read in bf16, one image still in fp32


def test_timing_the_precision_leaves_torch_random_numbers_as_they_were(model, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(precision_module, "bf16_product_slowdown", lambda device: 1.0)  # so that the job is timed
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    choose_precision("auto", model, "train")
    assert torch.equal(torch.rand(4), expected)  # a run's dropout draws the same masks, timed or cached
