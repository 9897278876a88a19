"""Int8 twins of float variants: static int8 quantization of a variant's ONNX (and TFLite) file.

The writer calls `quantize_variant` once per float variant, after the variant's float ONNX file exists:

    try:
        twin = quantize_variant(root, variant, model, data, samples, tflite=False)
    except QuantizationUnsupported as reason:
        log(f"warning: no int8 twin of {variant.id}, keeping the float variant only: {reason}")
    else:
        ...  # twin.variant into the portfolio, twin.expected as samples.npz's y_<twin id>

and later, for the twins it keeps, `add_int8_tflite(root, twin, f"variants/{twin.variant.id}.tflite",
check, log)` (or `tflite=True` above to do both at once). On any failure no file of the twin is left behind.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agent.portfolio import Variant, file_entry
from exporter.data import Dataset
from exporter.errors import ExportError
from exporter.export import eval_mode, export_tflite, run_tflite, tflite_input_shape
from exporter.quantize.common import CALIBRATION_COUNT, CALIBRATION_SEED, QuantizationUnsupported, calibration_batch
from exporter.quantize.onnx_int8 import OnnxInt8Settings, onnx_input_shape, quantize_onnx, run, session
from exporter.quantize.tflite_int8 import SETTINGS as TFLITE_SETTINGS
from exporter.quantize.tflite_int8 import quantize_tflite

__all__ = ["CALIBRATION_COUNT", "CALIBRATION_SEED", "CHECK_COUNT", "OnnxInt8Settings", "QuantizationUnsupported",
           "Quantized", "TRANSFORM", "add_int8_tflite", "quantize_variant", "twin_id"]

TRANSFORM = "int8"
CHECK_COUNT = 16  # check inputs (data.test_x[:16]), as the float exports use


@dataclass
class _TfliteSource:
    """What a twin's TFLite file is made from, kept between quantize_variant and add_int8_tflite."""

    model: nn.Module
    parent: Variant  # its float .tflite, once exported (the writer may do that after quantizing), is used
    calibration: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


@dataclass
class Quantized:
    variant: Variant  # the int8 twin's manifest entry, files included
    expected: np.ndarray  # the int8 ONNX file's outputs on the health-check samples: samples.npz's y_<twin id>
    seconds: float = 0.0  # how long quantize_variant took, all included
    tflite_source: _TfliteSource | None = field(default=None, repr=False)  # for add_int8_tflite


def twin_id(parent_id: str) -> str:
    return f"{parent_id}-{TRANSFORM}"


def quantize_variant(root: Path, parent: Variant, model: nn.Module, data: Dataset, samples: torch.Tensor,
                     tflite: bool, settings: OnnxInt8Settings = OnnxInt8Settings()) -> Quantized:
    """The int8 twin of `parent`, whose float ONNX file (and, with `tflite`, TFLite file) exists under `root`.

    Writes variants/<parent id>-int8.onnx under `root`, and with `tflite` variants/<parent id>-int8.tflite
    too (from the parent's float .tflite when it exists, else from a conversion of `model`); without it,
    add_int8_tflite can add the TFLite file later. Raises QuantizationUnsupported
    (one line naming the op) when the quantizer or the runtimes cannot handle the model, ExportError for
    bad input (e.g. calibration data not shaped like the model's input); either way nothing is left written
    (with `tflite`, a TFLite failure fails the whole twin; add_int8_tflite instead keeps the ONNX-only twin).
    """
    started = time.perf_counter()
    root = Path(root)
    float_onnx = _float_file(root, parent, "onnx")
    input_shape = onnx_input_shape(float_onnx)
    calibration = calibration_batch(data.train_x, input_shape, count=settings.count, seed=settings.seed)
    check = _images("check inputs (data.test_x)", data.test_x[:CHECK_COUNT], input_shape)
    test_x = _images("test inputs (data.test_x)", data.test_x, input_shape)
    sample_x = _images("health-check samples", samples, input_shape)
    test_y = data.test_y.numpy()
    if len(test_y) != len(test_x):
        raise ExportError(f"the test set has {len(test_x)} images but {len(test_y)} labels; fix the dataset")

    vid = twin_id(parent.id)
    onnx_rel, tflite_rel = f"variants/{vid}.onnx", f"variants/{vid}.tflite"
    for path in (root / onnx_rel, root / tflite_rel):
        if path.exists():
            raise ExportError(f"{path} already exists: quantize each variant once, into a fresh portfolio")
    try:
        onnx_diff = quantize_onnx(float_onnx, root / onnx_rel, calibration, check, settings)
        fast = session(root / onnx_rel, optimized=True)
        accuracy = float((run(fast, test_x).argmax(axis=1) == test_y).mean())
        expected = run(fast, sample_x)
        with eval_mode(model), torch.no_grad():
            float_check = model(torch.from_numpy(check)).numpy()
        details = {
            **settings.to_dict(),
            "calibration_count": len(calibration),
            # how far int8 strays from float on the check inputs: information, not a tolerance
            "float_max_abs_diff": float(np.max(np.abs(run(fast, check) - float_check))),
        }
        metrics = {key: value for key, value in parent.metrics.items() if key not in ("accuracy", "n")}
        metrics.update(accuracy=accuracy, n=len(test_x))
        variant = Variant(
            id=vid, method=f"{parent.method}+{TRANSFORM}", parent=parent.id, density=parent.density,
            params=parent.params, params_nonzero=parent.params_nonzero, macs=parent.macs, metrics=metrics,
            files={"onnx": file_entry(root, onnx_rel, onnx_diff)}, details={"quantization": details},
        )
        source = _TfliteSource(model, parent, calibration, test_x, test_y)
        if tflite:
            _write_int8_tflite(root, variant, tflite_rel, check, source)
    except BaseException:
        for path in (root / onnx_rel, root / tflite_rel):
            path.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started
    details["seconds"] = round(seconds, 2)
    return Quantized(variant=variant, expected=expected, seconds=seconds, tflite_source=None if tflite else source)


def add_int8_tflite(root: Path, quantized: Quantized, rel: str, check: torch.Tensor, log) -> bool:
    """Give the int8 twin `quantized` (made by quantize_variant with tflite=False) its int8 TFLite file at root/rel.

    True when written (variant.files["tflite"] is set); False, with a warning logged, when LiteRT's
    quantizer or runtime cannot handle the model: the twin then serves from its ONNX file only.
    """
    root = Path(root)
    variant, source = quantized.variant, quantized.tflite_source
    quantized.tflite_source = None  # the model and images it holds are not needed any more
    if source is None:
        raise ExportError(f"{variant.id} has no int8 TFLite source: it was made with tflite=True, "
                          "or its TFLite file was added already")
    try:
        _write_int8_tflite(root, variant, rel, _images("check inputs", check, list(source.calibration.shape[1:])),
                           source)
    except QuantizationUnsupported as reason:
        log(f"warning: no int8 TFLite file for {variant.id}, it serves from ONNX only: {reason}")
        return False
    return True


def _write_int8_tflite(root: Path, variant: Variant, rel: str, check: np.ndarray, source: _TfliteSource) -> None:
    """Quantize the float TFLite model (the parent's file, or a conversion of the torch model) into root/rel."""
    started = time.perf_counter()
    reference = run(session(root / variant.files["onnx"].path, optimized=True), check)
    try:
        with tempfile.TemporaryDirectory(prefix="edgeshift-int8-") as work:
            entry = source.parent.files.get("tflite")
            float_tflite = root / entry.path if entry is not None else None
            if float_tflite is None or not float_tflite.is_file():
                float_tflite = Path(work) / "float.tflite"
                export_tflite(source.model, torch.from_numpy(check), float_tflite)
            diff = quantize_tflite(float_tflite, root / rel, source.calibration, check, reference)
        variant.files["tflite"] = file_entry(root, rel, diff, tflite_input_shape(root / rel))
        predictions = run_tflite(root / rel, source.test_x).argmax(axis=1)
    except BaseException:
        (root / rel).unlink(missing_ok=True)
        variant.files.pop("tflite", None)
        raise
    variant.details.setdefault("quantization", {})["tflite"] = {
        **TFLITE_SETTINGS,
        "accuracy": float((predictions == source.test_y).mean()),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _float_file(root: Path, parent: Variant, fmt: str) -> Path:
    if fmt not in parent.files:
        raise ExportError(f"variant {parent.id} has no float {fmt} file to quantize: export it first")
    path = root / parent.files[fmt].path
    if not path.is_file():
        raise ExportError(f"the float {fmt} file of variant {parent.id} is missing at {path}: export it first")
    return path


def _images(what: str, images: torch.Tensor, input_shape: list[int]) -> np.ndarray:
    expected = "[N, " + ", ".join(str(size) for size in input_shape) + "]"
    if (not isinstance(images, torch.Tensor) or images.dtype != torch.float32 or len(images) == 0
            or list(images.shape[1:]) != list(input_shape)):
        got = list(images.shape) if hasattr(images, "shape") else type(images).__name__
        dtype = getattr(images, "dtype", "")
        raise ExportError(f"{what} must be float32 images of shape {expected} like the model's input, "
                          f"got {got} {dtype}")
    return np.ascontiguousarray(images.detach().cpu().numpy())
