"""--device and --amp: how a device name resolves, one clear line when it cannot, and training that
gives the same weights wherever it runs (exactly on the CPU, within float tolerance on CUDA)."""
import json

import pytest
import torch

from exporter.cli import main
from exporter.data import Dataset, load_dataset
from exporter.device import CPU, device_of, resolve_device
from exporter.errors import ExportError
from exporter.models import build_model
from exporter.pruning.masks import full_masks, global_magnitude_prune, prunable_weights
from exporter.train import TrainConfig, seeded, train

ACCELERATED = torch.cuda.is_available() or torch.backends.mps.is_available()
cpu_only = pytest.mark.skipif(ACCELERATED, reason="auto picks the accelerator this machine has")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
TINY_TRAIN = ["--model", "resnet20", "--width", "0.25", "--epochs", "1", "--rewind-iteration", "5", "--quiet"]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture
def few_digits(digits) -> Dataset:
    """Four training steps' worth: short enough that CPU and CUDA float rounding cannot drift apart."""
    return Dataset(digits.name, digits.train_x[:256], digits.train_y[:256], digits.test_x, digits.test_y,
                   digits.labels, digits.preprocessing)


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def one_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_auto_is_the_cpu_without_an_accelerator_and_spellings_are_forgiven(no_accelerator):
    assert resolve_device("auto") == resolve_device("cpu") == resolve_device(" CPU ") == CPU


def test_auto_prefers_cuda_then_mps(monkeypatch, one_cuda_device):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)  # with its index: the manifest names one device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize("spec, message", [
    ("cuda", "--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); use --device cpu"),
    ("cuda:0", "--device cuda:0: no CUDA device is visible"),
    ("mps", "--device mps: MPS is not available (torch.backends.mps.is_available() is False); use --device cpu"),
    ("gpu", "--device gpu: unknown device; use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:one", "--device cuda:one: unknown device"),
    ("cuda:", "--device cuda:: unknown device"),
])
def test_a_device_this_machine_lacks_is_one_clear_line(no_accelerator, spec, message):
    with pytest.raises(ExportError) as error:
        resolve_device(spec)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_cuda_index_past_the_last_device_is_refused(one_cuda_device):
    with pytest.raises(ExportError, match=r"^--device cuda:7: there is no CUDA device 7; this machine has cuda:0$"):
        resolve_device("cuda:7")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "portfolio"])
def test_the_cli_refuses_cuda_here_in_one_line_and_writes_nothing(tmp_path, capsys, command):
    out = tmp_path / ("dense.pt" if command == "train" else "portfolio")

    assert main([command, "--out", str(out), *TINY_TRAIN, "--device", "cuda"]) == 2

    captured = capsys.readouterr()
    assert captured.err == ("edgeshift-export: error: --device cuda: no CUDA device is visible "
                            "(torch.cuda.is_available() is False); use --device cpu\n")
    assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_an_unknown_amp_mode_is_refused():
    with pytest.raises(ExportError, match="--amp must be one of off, bf16, fp16"):
        TrainConfig(amp="fp8").resolved()


@cpu_only
def test_auto_trains_exactly_what_cpu_trains_and_the_checkpoint_says_where(tmp_path):
    saved = {}
    for device in ("cpu", "auto"):
        checkpoint = tmp_path / f"{device}.pt"
        assert main(["train", "--out", str(checkpoint), *TINY_TRAIN, "--device", device]) == 0
        saved[device] = torch.load(checkpoint, weights_only=True)

    assert saved["cpu"]["train"]["device"] == saved["auto"]["train"]["device"] == "cpu"
    assert saved["cpu"]["accuracy"] == saved["auto"]["accuracy"]
    for name, tensor in saved["cpu"]["model"].items():
        assert torch.equal(tensor, saved["auto"]["model"][name]), name
    for name, tensor in saved["cpu"]["rewind"].items():
        assert torch.equal(tensor, saved["auto"]["rewind"][name]), name


def test_where_weights_were_trained_is_not_part_of_a_run_directory_key():
    assert TrainConfig(device="cpu").settings() == TrainConfig(device="cuda:0").settings()
    assert "amp" not in TrainConfig().settings()  # run directories from before --amp still match
    assert TrainConfig(amp="bf16").settings()["amp"] == "bf16"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_float32_weights_and_keeps_masks(few_digits, amp):
    model = seeded(0, lambda: build_model("resnet20", width=0.25))
    weights = prunable_weights(model, model.fc, include_classifier=False)
    masks = global_magnitude_prune(weights, full_masks(weights), 0.5)

    result = train(model, few_digits, TrainConfig(epochs=1, amp=amp, device="auto"), masks=masks, progress=False)

    assert 0 <= result.accuracy <= 1
    assert {p.dtype for p in model.parameters()} == {torch.float32} and device_of(model) == CPU
    for name, mask in masks.ranked.items():
        assert (dict(model.named_parameters())[name][~mask] == 0).all()


def test_training_feeds_contiguous_batches_even_from_channels_last_data(few_digits):
    """Channels-last 1x1 convolutions with under 16 input channels write out of bounds in torch 2.13's oneDNN."""
    channels_last = Dataset(few_digits.name, few_digits.train_x.contiguous(memory_format=torch.channels_last),
                            few_digits.train_y, few_digits.test_x, few_digits.test_y, few_digits.labels,
                            few_digits.preprocessing)
    model = seeded(0, lambda: build_model("resnet20", width=0.25))
    layouts = []
    model.conv1.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))

    train(model, channels_last, TrainConfig(epochs=1, device="cpu"), progress=False)

    assert layouts and all(layouts)


@needs_cuda
def test_cuda_training_matches_cpu_training_and_comes_back_to_the_cpu(few_digits, monkeypatch):
    # TF32 convolutions round to 10 bits of mantissa: compare float32 with float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    models, results = {}, {}
    for device in ("cpu", "cuda"):
        models[device] = seeded(0, lambda: build_model("resnet20", width=0.25))
        results[device] = train(models[device], few_digits, TrainConfig(epochs=1, device=device), rewind_iteration=2,
                                progress=False)

    assert device_of(models["cuda"]) == CPU
    assert all(t.device == CPU for t in results["cuda"].rewind_state.values())
    assert results["cuda"].accuracy == pytest.approx(results["cpu"].accuracy, abs=0.02)
    cpu_state, cuda_state = models["cpu"].state_dict(), models["cuda"].state_dict()
    for name, tensor in cpu_state.items():
        torch.testing.assert_close(cuda_state[name], tensor, atol=1e-3, rtol=1e-3, msg=name)


@needs_cuda
def test_pai_scoring_on_cuda_keeps_every_mask_and_score_on_the_cpu():
    from exporter.reconvene.reconvene import ReconveneConfig, reconvene

    model = seeded(0, lambda: build_model("resnet20", width=0.25))
    batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    for scorer in ("snip", "synflow"):
        result = reconvene(model, 1 / 8, ReconveneConfig(scorer=scorer, synflow_rounds=3), batch,
                           device=torch.device("cuda"))
        assert all(m.device == CPU for m in result.unstructured.ranked.values())
        assert device_of(result.shrunk.model) == CPU and device_of(model) == CPU


def test_the_portfolio_manifest_records_the_resolved_device(tmp_path):
    from agent.portfolio import Portfolio

    out = tmp_path / "portfolio"
    assert main(["portfolio", "--out", str(out), *TINY_TRAIN, "--method", "dnnshifter", "--imp-levels", "0",
                 "--levels", "0", "--quantize", "none", "--no-tflite"]) == 0

    recorded = json.loads(Portfolio.open(out).manifest.exporter["train"])
    assert recorded["device"] == str(resolve_device("auto")) and recorded["amp"] == "off"
