"""Int8 twins (exporter.quantize): the ONNX and TFLite files, their manifest entries, and the agent's health check."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from agent.cli import main as agent_main
from agent.portfolio import Manifest, Preprocessing, TensorSpec, Variant, file_entry, save_samples, write_manifest
from exporter.data import Dataset, load_dataset
from exporter.errors import ExportError
from exporter.export import export_onnx, load_tflite_interpreter
from exporter.quantize import QuantizationUnsupported, add_int8_tflite, quantize_variant
from exporter.train import TrainConfig, evaluate, train

SAMPLES = 8
logs: list[str] = []


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class GroupedTransposedConvNet(nn.Module):
    """onnxruntime 1.32's QDQ quantizer fails on a grouped ConvTranspose with per-channel weights: it
    quantizes the bias with one scale per group's output channel instead of one per output channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, groups=2)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(torch.relu(self.conv(x))).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def _float_portfolio(root: Path, model: nn.Module, data: Dataset) -> Variant:
    """A portfolio root holding one float variant's ONNX file, as the writer leaves it before quantizing."""
    (root / "variants").mkdir(parents=True)
    diff = export_onnx(model, data.test_x[:16], root / "variants/dense.onnx")
    accuracy = evaluate(model, data.test_x, data.test_y)
    return Variant(id="dense", method="dense", parent=None, density=1.0, params=1234, params_nonzero=1200,
                   macs=56789, metrics={"accuracy": accuracy, "dataset": data.name, "n": len(data.test_y)},
                   files={"onnx": file_entry(root, "variants/dense.onnx", diff)})


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory, digits: Dataset):
    """A trained tiny model's int8 twin made the writer's way: ONNX first, then the TFLite file."""
    torch.manual_seed(0)
    model = TinyConvNet()
    train(model, digits, TrainConfig(epochs=2, lr=0.1, milestones=()), progress=False)
    model.eval()
    root = tmp_path_factory.mktemp("int8") / "portfolio"
    parent = _float_portfolio(root, model, digits)
    quantized = quantize_variant(root, parent, model, digits, digits.test_x[:SAMPLES], tflite=False)
    assert "tflite" not in quantized.variant.files
    assert add_int8_tflite(root, quantized, f"variants/{quantized.variant.id}.tflite",
                           digits.test_x[:16], logs.append), logs
    return root, parent, model, quantized


def test_int8_onnx_file_has_int8_weights_and_runs(twin, digits: Dataset):
    root, parent, model, quantized = twin
    path = root / quantized.variant.files["onnx"].path
    assert path == root / "variants/dense-int8.onnx"
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_weights) == 2  # both convolutions' weights
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": digits.test_x[:SAMPLES].numpy()})[0]
    np.testing.assert_allclose(outputs, quantized.expected, atol=1e-6)
    with torch.no_grad():
        float_outputs = model(digits.test_x[:SAMPLES]).numpy()
    assert np.abs(outputs - float_outputs).max() < 0.1 * max(1.0, np.abs(float_outputs).max())


def test_twin_manifest_entry(twin, digits: Dataset):
    root, parent, _, quantized = twin
    v = quantized.variant
    assert (v.id, v.method, v.parent) == ("dense-int8", "dense+int8", "dense")
    assert (v.density, v.params, v.params_nonzero, v.macs) == (1.0, 1234, 1200, 56789)
    session = ort.InferenceSession(str(root / v.files["onnx"].path), providers=["CPUExecutionProvider"])
    predictions = session.run(None, {"input": digits.test_x.numpy()})[0].argmax(axis=1)
    assert v.metrics == {"accuracy": pytest.approx(float((predictions == digits.test_y.numpy()).mean())),
                         "dataset": "digits", "n": len(digits.test_y)}
    assert v.metrics["accuracy"] > 0.5
    assert abs(v.metrics["accuracy"] - parent.metrics["accuracy"]) < 0.05
    assert 0 < v.files["onnx"].max_abs_diff < 0.5
    settings = v.details["quantization"]
    assert settings["calibration_count"] == 256 and settings["format"] == "QDQ"
    assert settings["tflite"]["accuracy"] > 0.5


def test_int8_tflite_runs_at_batch_one_with_float_io(twin, digits: Dataset):
    root, _, _, quantized = twin
    entry = quantized.variant.files["tflite"]
    assert entry.input_shape == [1, 3, 32, 32]
    interpreter = load_tflite_interpreter(root / entry.path)
    (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert (given["dtype"], taken["dtype"]) == (np.float32, np.float32)
    assert list(taken["shape"]) == [1, 10]
    ops = {detail["op_name"] for detail in interpreter._get_ops_details()}
    assert {"QUANTIZE", "DEQUANTIZE"} <= ops  # int8 inside, float32 at the edges
    interpreter.set_tensor(given["index"], digits.test_x[:1].numpy())
    interpreter.invoke()
    output = interpreter.get_tensor(taken["index"])
    assert np.abs(output - quantized.expected[:1]).max() <= entry.max_abs_diff


def test_agent_health_check_passes_for_both_backends(twin, digits: Dataset, capsys):
    root, parent, model, quantized = twin
    from exporter.export import export_tflite

    diff = export_tflite(model, digits.test_x[:16], root / "variants/dense.tflite")
    parent.files["tflite"] = file_entry(root, "variants/dense.tflite", diff, [1, 3, 32, 32])
    with torch.no_grad():
        float_expected = model(digits.test_x[:SAMPLES]).numpy()
    save_samples(root, [digits.test_x[:SAMPLES].numpy()], {"dense": float_expected, "dense-int8": quantized.expected})
    write_manifest(root, Manifest(
        name="int8", task="classification",
        inputs=[TensorSpec("input", "float32", [-1, 3, 32, 32], "NCHW")],
        outputs=[TensorSpec("logits", "float32", [-1, 10])],
        variants=[parent, quantized.variant], default_variant="dense",
        labels=list(digits.labels), preprocessing=Preprocessing(**digits.preprocessing),
    ))
    for backend in ("onnxruntime", "tflite"):
        assert agent_main(["check", str(root), "--backend", backend, "--threads", "1"]) == 0, capsys.readouterr()
        out = capsys.readouterr().out
        assert "dense-int8" in out and "ok" in out.split("dense-int8")[1].splitlines()[0]


def test_twin_of_a_variant_with_a_float_tflite_file(tmp_path: Path, digits: Dataset):
    """With tflite=True the TFLite file is quantized from the parent's float .tflite right away."""
    torch.manual_seed(1)
    model = TinyConvNet().eval()
    parent = _float_portfolio(tmp_path, model, digits)
    from exporter.export import export_tflite

    export_tflite(model, digits.test_x[:16], tmp_path / "variants/dense.tflite")
    parent.files["tflite"] = file_entry(tmp_path, "variants/dense.tflite", 0.0, [1, 3, 32, 32])
    quantized = quantize_variant(tmp_path, parent, model, digits, digits.test_x[:SAMPLES], tflite=True)
    assert set(quantized.variant.files) == {"onnx", "tflite"}
    assert (tmp_path / "variants/dense-int8.tflite").is_file()


def test_wrong_calibration_shape_is_one_line_and_writes_nothing(tmp_path: Path, digits: Dataset):
    model = TinyConvNet().eval()
    parent = _float_portfolio(tmp_path, model, digits)
    small = Dataset(digits.name, digits.train_x[:, :, :16, :16].contiguous(), digits.train_y,
                    digits.test_x, digits.test_y, digits.labels, digits.preprocessing)
    with pytest.raises(ExportError, match=r"shape \[N, 3, 32, 32\].*got \[1347, 3, 16, 16\]") as caught:
        quantize_variant(tmp_path, parent, model, small, digits.test_x[:SAMPLES], tflite=True)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "variants").iterdir()) == ["dense.onnx"]


def test_op_the_quantizer_refuses_raises_unsupported_and_leaves_no_files(tmp_path: Path, digits: Dataset):
    torch.manual_seed(0)
    model = GroupedTransposedConvNet().eval()
    parent = _float_portfolio(tmp_path, model, digits)
    with pytest.raises(QuantizationUnsupported, match="ConvTranspose") as caught:
        quantize_variant(tmp_path, parent, model, digits, digits.test_x[:SAMPLES], tflite=True)
    assert caught.value.op == "ConvTranspose"
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ExportError)  # uncaught, the CLI still prints it as one line
    assert sorted(p.name for p in (tmp_path / "variants").iterdir()) == ["dense.onnx"]


def test_a_twin_gets_its_tflite_file_once(twin, digits: Dataset):
    root, _, _, quantized = twin
    with pytest.raises(ExportError, match="has no int8 TFLite source"):
        add_int8_tflite(root, quantized, "variants/again.tflite", digits.test_x[:16], print)
    assert not (root / "variants/again.tflite").exists()
