"""Static int8 quantization of a float ONNX classifier with onnxruntime: QDQ format, per-channel int8 weights.

The settings were chosen by measurement (VGG-16 width 0.5 trained on digits, 256 calibration images):
MinMax, Percentile and Entropy calibration, uint8 or int8 activations, with or without reduce_range, all
kept the float model's test accuracy exactly (0.9867 on 450 images) and ran within 10% of each other,
about 3x faster than float (batch 1, one thread, AVX512-VNNI). So the cheapest and most predictable are used:
MinMax calibration, uint8 activations (the u8s8 kernels onnxruntime prefers on x86), and reduce_range, i.e.
7-bit weights: on x86 CPUs without VNNI the u8s8 dot product (vpmaddubsw) sums pairs into int16 and can
saturate with full 8-bit weights, which would give a device other outputs than the exporter's.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from exporter.errors import ExportError
from exporter.export import ONNX_INPUT_NAME, ONNX_OUTPUT_NAME, run_quietly
from exporter.quantize.common import CALIBRATION_COUNT, CALIBRATION_SEED, QuantizationUnsupported, failing_op, one_line

CALIBRATION_BATCH = 32
# Used as max_abs_diff when the optimized int8 kernels agree exactly with the literal QDQ graph on the check
# inputs: another CPU (other kernels, other rounding of the requantization) may still differ by a step of
# the output's quantization, so the recorded difference must not be 0 (the agent allows 10x of it).
FALLBACK_DIFF_FLOOR = 1e-5


@dataclass(frozen=True)
class OnnxInt8Settings:
    calibration: str = "minmax"  # "minmax", "percentile" or "entropy"
    activations: str = "uint8"  # "uint8" or "int8"
    reduce_range: bool = True  # 7-bit weights: no int16 saturation on x86 CPUs without VNNI
    per_channel: bool = True
    count: int = CALIBRATION_COUNT
    seed: int = CALIBRATION_SEED

    def to_dict(self) -> dict:
        return {"format": "QDQ", "weights": "int8 per-channel" if self.per_channel else "int8 per-tensor",
                "activations": self.activations, "calibration": self.calibration,
                "reduce_range": self.reduce_range, "calibration_seed": self.seed}


def onnx_input_shape(path: Path) -> list[int]:
    """The [C, H, W] an ONNX image classifier takes (its batch dimension left out)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ExportError(f"cannot read the float ONNX file {path}: {one_line(error)}; "
                          "re-export the variant") from error
    dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    if not dims or any(not dim.HasField("dim_value") for dim in dims):
        raise ExportError(f"the float ONNX file {path} has no fixed [C, H, W] input shape; re-export the variant")
    return [int(dim.dim_value) for dim in dims]


def quantize_onnx(float_path: Path, out_path: Path, calibration: np.ndarray, check: np.ndarray,
                  settings: OnnxInt8Settings = OnnxInt8Settings()) -> float:
    """Write the int8 twin of `float_path` to `out_path` and return its recorded max_abs_diff.

    On failure nothing is left at `out_path`: QuantizationUnsupported when the quantizer or onnxruntime
    (loading or running the result) refuses an op, ExportError for bad input.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, out_path = Path(float_path), Path(out_path)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if settings.calibration not in methods or settings.activations not in types:
        raise ExportError(f"unknown int8 settings {settings}: calibration is one of {', '.join(methods)}, "
                          f"activations one of {', '.join(types)}")
    nodes = _node_types(float_path)
    with tempfile.TemporaryDirectory(prefix="edgeshift-int8-") as work:
        prepared, quantized = Path(work) / "prepared.onnx", Path(work) / "int8.onnx"

        def quantize() -> None:
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=False)
            nodes.update(_node_types(prepared))
            quantize_static(
                str(prepared), str(quantized), _Reader(calibration),
                quant_format=QuantFormat.QDQ, per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                activation_type=types[settings.activations], weight_type=QuantType.QInt8,
                calibrate_method=methods[settings.calibration],
            )

        _unsupported_on_failure("onnxruntime's int8 quantizer", float_path, nodes, quantize)
        if not any(node.op_type == "QuantizeLinear" for node in onnx.load(str(quantized)).graph.node):
            ops = ", ".join(sorted(set(nodes.values())))
            raise QuantizationUnsupported(f"onnxruntime's int8 quantizer quantized none of the model's ops ({ops})")
        fast = session(quantized, optimized=True)
        _unsupported_on_failure("onnxruntime running the int8 model", float_path, nodes,
                                lambda: (run(fast, check), run(fast, check[:1])))
        diff = kernel_difference(quantized, check)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(quantized), str(out_path))
    return diff


def session(path: Path, *, optimized: bool) -> ort.InferenceSession:
    """ORT_ENABLE_ALL: the fused int8 kernels the agent runs; ORT_DISABLE_ALL: the QDQ graph computed literally."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    return np.concatenate([sess.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: inputs[i:i + batch_size]})[0]
                           for i in range(0, len(inputs), batch_size)])


def kernel_difference(path: Path, check: np.ndarray) -> float:
    """How far onnxruntime's optimized int8 kernels stray from the QDQ semantics: the file's max_abs_diff.

    Measured on the whole check batch and on its first sample alone; floored at one quantization step of
    the output (or FALLBACK_DIFF_FLOOR), since other CPUs may round the requantization otherwise.
    """
    fast, literal = session(path, optimized=True), session(path, optimized=False)
    reference = run(literal, check).astype(np.float64)
    diff = max(float(np.max(np.abs(run(fast, check) - reference))),
               float(np.max(np.abs(run(fast, check[:1]) - reference[:1]))))
    if not np.isfinite(diff):
        raise ExportError(f"the int8 model {path} outputs NaN or inf on the check inputs; keep the float variant")
    return max(diff, output_step(path))


def output_step(path: Path) -> float:
    """The quantization step of the model's output (the scale of the DequantizeLinear producing it), if any."""
    graph = onnx.load(str(path)).graph
    initializers = {init.name: init for init in graph.initializer}
    outputs = {output.name for output in graph.output}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in outputs and node.input[1] in initializers:
            scale = numpy_helper.to_array(initializers[node.input[1]])
            if scale.size and np.isfinite(scale).all():
                return float(np.max(scale))
    return FALLBACK_DIFF_FLOOR


def _node_types(path: Path) -> dict[str, str]:
    try:
        return {node.name: node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    except Exception:
        return {}


def _unsupported_on_failure(action: str, path: Path, nodes: dict[str, str], work) -> None:
    """Run `work` quietly; an exception becomes QuantizationUnsupported naming the op, where one can be found."""
    try:
        run_quietly(action, path, work, hint="keep the float variant")
    except QuantizationUnsupported:
        raise
    except ExportError as error:
        cause = error.__cause__
        if cause is None:
            raise
        op = failing_op(cause, nodes)
        what = f"op {op}" if op else "an op of this model"
        raise QuantizationUnsupported(f"{action} cannot handle {what}: {type(cause).__name__}: {one_line(cause)}",
                                      op=op) from cause


class _Reader(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader protocol over an array of images, in batches."""

    def __init__(self, images: np.ndarray):
        self._batches = iter([images[i:i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {ONNX_INPUT_NAME: batch}
