from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from exporter.errors import ExportError
from exporter.export import check_outputs, export_onnx, export_tflite, load_tflite_interpreter, tflite_input_shape
from exporter.latency import interleaved_latency_ms, onnx_latency_ms


class TinyConvNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.classifier = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResidualDepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + torch.relu(self.norm(self.depthwise(x)))
        return self.head(x.mean(dim=(2, 3)))


class DifferentWhenExported(nn.Module):
    """Eager and exported graphs disagree on purpose, so every export check must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.mean(dim=(2, 3)))
        return logits + 1.0 if torch.compiler.is_exporting() else logits


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def trained_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, then switch to eval."""
    with torch.no_grad():
        model.train()(images(8) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("model_class", [TinyConvNet, ResidualDepthwiseNet])
def test_onnx_export_matches_torch_at_any_batch(model_class: type[nn.Module], tmp_path: Path) -> None:
    model = trained_bn(model_class())
    path = tmp_path / "model.onnx"

    diff = export_onnx(model, images(4), path)

    assert isinstance(diff, float) and 0.0 <= diff < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        inputs = images(batch)
        (logits,) = session.run(["logits"], {"input": inputs.numpy()})
        np.testing.assert_allclose(logits, model(inputs).detach().numpy(), atol=1e-4)


@pytest.mark.parametrize("model_class", [TinyConvNet, ResidualDepthwiseNet])
def test_tflite_export_matches_torch_at_batch_one(model_class: type[nn.Module], tmp_path: Path) -> None:
    model = trained_bn(model_class())
    path = tmp_path / "model.tflite"

    diff = export_tflite(model, images(3), path)

    assert isinstance(diff, float) and 0.0 <= diff < 1e-4
    assert tflite_input_shape(path) == [1, 3, 16, 16]
    interpreter = load_tflite_interpreter(path, num_threads=1)
    assert interpreter.get_output_details()[0]["shape"].tolist() == [1, model(images(1)).shape[1]]


def test_export_restores_training_mode(tmp_path: Path) -> None:
    model = TinyConvNet().train()

    export_onnx(model, images(2), tmp_path / "model.onnx")

    assert model.training


def test_export_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = TinyConvNet().eval()

    export_onnx(model, images(2), tmp_path / "model.onnx")
    export_tflite(model, images(2), tmp_path / "model.tflite")

    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


def test_check_returns_the_max_abs_difference() -> None:
    torch_out = np.array([[1.0, -2.0], [0.5, 3.0]])
    other_out = torch_out + np.array([[1e-5, -3e-5], [0.0, 2e-5]])

    assert check_outputs(torch_out, other_out, 1e-4, Path("m.onnx")) == pytest.approx(3e-5)


def test_check_tolerance_scales_with_large_logits() -> None:
    torch_out = np.array([[1000.0, 0.0]])

    assert check_outputs(torch_out, torch_out + 0.05, 1e-4, Path("m.onnx")) == pytest.approx(0.05)
    with pytest.raises(ExportError, match=r"0\.2 > tolerance 0\.1 .*m\.onnx"):
        check_outputs(torch_out, torch_out + 0.2, 1e-4, Path("m.onnx"))


def test_an_absolute_check_does_not_scale_with_large_logits() -> None:
    torch_out = np.array([[35.0, 0.0]])

    assert check_outputs(torch_out, torch_out + 5e-4, 1e-3, Path("lm.onnx"), relative=False) == pytest.approx(5e-4)
    with pytest.raises(ExportError, match=r"0\.002 > tolerance 0\.001 .*lm\.onnx"):
        check_outputs(torch_out, torch_out + 2e-3, 1e-3, Path("lm.onnx"), relative=False)


def test_check_rejects_nan_and_shape_mismatch() -> None:
    torch_out = np.zeros((2, 3))

    with pytest.raises(ExportError, match="tolerance"):
        check_outputs(torch_out, np.full((2, 3), np.nan), 1e-4, Path("m.onnx"))
    with pytest.raises(ExportError, match="shape"):
        check_outputs(torch_out, np.zeros((1, 3)), 1e-4, Path("m.onnx"))


def test_onnx_export_that_differs_from_torch_fails(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="ONNX output differs from torch by 1 > tolerance"):
        export_onnx(DifferentWhenExported().eval(), images(2), tmp_path / "model.onnx")


def test_tflite_export_that_differs_from_torch_fails(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="TFLite output differs from torch by 1 > tolerance"):
        export_tflite(DifferentWhenExported().eval(), images(2), tmp_path / "model.tflite")


def test_untraceable_model_fails_with_the_exporter_reason(tmp_path: Path) -> None:
    class DataDependentBranch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3)) if x.sum() > 0 else x.amax(dim=(2, 3))

    with pytest.raises(ExportError, match="ONNX export failed for .*model.onnx: .*torch.export"):
        export_onnx(DataDependentBranch().eval(), images(2), tmp_path / "model.onnx")


def test_export_rejects_inputs_that_are_not_an_image_batch(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"\[N, C, H, W\]"):
        export_onnx(TinyConvNet().eval(), torch.randn(3, 16, 16), tmp_path / "model.onnx")


def test_interleaved_latency_of_two_models(tmp_path: Path) -> None:
    small, large = tmp_path / "small.onnx", tmp_path / "large.onnx"
    export_onnx(TinyConvNet().eval(), images(1), small)
    export_onnx(ResidualDepthwiseNet().eval(), images(1), large)
    sample = images(1).numpy()

    latency = interleaved_latency_ms({"small": small, "large": large}, sample, warmup=2, rounds=10, threads=1)
    alone = onnx_latency_ms(small, sample, warmup=2, runs=10)

    assert set(latency) == {"small", "large"}
    for stats in (*latency.values(), alone):
        assert 0.0 < stats["p50"] <= stats["p95"]


def test_latency_needs_a_batch_one_sample(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    export_onnx(TinyConvNet().eval(), images(1), path)

    with pytest.raises(ExportError, match="batch 1"):
        onnx_latency_ms(path, images(2).numpy())
