"""Static int8 quantization of a float TFLite classifier with ai-edge-quantizer, keeping float32 input and output.

litert-torch 0.10 offers two int8 paths: PT2E quantization of the torch model at conversion
(`litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=...))`) and ai-edge-quantizer recipes
applied to a .tflite file. The second is used: it starts from the float file the exporter already
converted and checked, needs no second conversion, and its `static_wi8_ai8` recipe (int8 per-channel
symmetric weights, int8 asymmetric activations, min/max ranges) gives integer kernels. Left alone
that recipe also makes the model's input and output int8; the graph's INPUT and OUTPUT are excluded
from quantization so the file takes and returns float32 (a QUANTIZE op after the input, a DEQUANTIZE
before the output), as the agent feeds it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from exporter.errors import ExportError
from exporter.export import load_tflite_interpreter, run_quietly, run_tflite
from exporter.quantize.common import QuantizationUnsupported, failing_op, one_line

FALLBACK_DIFF_FLOOR = 1e-5  # see onnx_int8.FALLBACK_DIFF_FLOOR
SETTINGS = {"tool": "ai-edge-quantizer", "recipe": "static_wi8_ai8", "weights": "int8 per-channel",
            "activations": "int8", "calibration": "minmax", "io": "float32"}


def quantize_tflite(float_path: Path, out_path: Path, calibration: np.ndarray, check: np.ndarray,
                    reference: np.ndarray) -> float:
    """Write the int8 twin of the float .tflite `float_path` to `out_path`; return its max abs difference
    from `reference` (the int8 ONNX file's outputs on `check`), run one sample at a time.

    On failure nothing is left at `out_path`: QuantizationUnsupported when the quantizer refuses an op
    or the result does not run with float32 input and output.
    """
    float_path, out_path = Path(float_path), Path(out_path)
    signature, input_name = _signature(float_path)
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)

    def quantize() -> bytes:
        from ai_edge_quantizer import calibrator, quantizer, recipe, recipe_manager
        from ai_edge_quantizer.algorithm_manager import AlgorithmName
        from ai_edge_quantizer.utils import qsv_utils

        tool = quantizer.Quantizer(str(float_path), recipe.static_wi8_ai8())
        for io_op in (quantizer.qtyping.TFLOperationName.INPUT, quantizer.qtyping.TFLOperationName.OUTPUT):
            tool.update_quantization_recipe(".*", io_op, algorithm_key=AlgorithmName.NO_QUANTIZE)
        # Quantizer.calibrate keeps a moving average (factor 0.95) of each sample's min and max: with
        # batch-1 samples that is a typical sample's range, and an outlier's activations are clipped
        # (VGG-16 width 0.5 on digits: logits off by 2.2 on one of 16 test images). Calibrate with the
        # global min and max instead, as onnxruntime's MinMax does.
        plan = recipe_manager.RecipeManager()
        plan.load_quantization_recipe(tool.get_quantization_recipe())
        calibration_run = calibrator.Calibrator(float_path.read_bytes(), num_threads=min(16, os.cpu_count() or 1),
                                                qsv_update_func=qsv_utils.min_max_update)
        calibration_run.calibrate({signature: [{input_name: image[np.newaxis]} for image in calibration]}, plan)
        result = tool.quantize(calibration_run.get_model_qsvs(), enable_progress_bar=False,
                               enable_progress_report=False)
        return bytes(result.quantized_model)

    content = _unsupported_on_failure("ai-edge-quantizer", float_path, quantize)
    handle, temp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content)
        actual = _unsupported_on_failure("LiteRT running the int8 model", float_path,
                                         lambda: run_tflite(Path(temp_name), check))
        if reference.shape != actual.shape:
            raise QuantizationUnsupported(f"the int8 TFLite model outputs shape {list(actual.shape)}, "
                                          f"not {list(reference.shape)} like the int8 ONNX model")
        diff = float(np.max(np.abs(actual.astype(np.float64) - reference.astype(np.float64))))
        if not np.isfinite(diff):
            raise QuantizationUnsupported("the int8 TFLite model outputs NaN or inf on the check inputs")
        os.chmod(temp_name, 0o644)  # mkstemp makes it private; an agent running as another user must read it
        os.replace(temp_name, out_path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return max(diff, FALLBACK_DIFF_FLOOR)


def tflite_ops(path: Path) -> set[str]:
    """The op names in a .tflite file (as the interpreter lists them)."""
    interpreter = load_tflite_interpreter(path)
    return {detail["op_name"] for detail in interpreter._get_ops_details()}


def _signature(path: Path) -> tuple[str, str]:
    interpreter = load_tflite_interpreter(path)
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        raise ExportError(f"{path} has {len(signatures)} signatures, not one; re-export the float variant")
    key, signature = next(iter(signatures.items()))
    if len(signature["inputs"]) != 1:
        raise ExportError(f"{path} takes {len(signature['inputs'])} inputs, not one image batch")
    return key, signature["inputs"][0]


def _unsupported_on_failure(action: str, path: Path, work):
    try:
        return run_quietly(action, path, work, hint="keep the float variant")
    except QuantizationUnsupported:
        raise
    except ExportError as error:
        cause = error.__cause__ or error
        op = failing_op(cause, {})
        what = f"op {op}" if op else "an op of this model"
        raise QuantizationUnsupported(f"{action} cannot handle {what}: {type(cause).__name__}: {one_line(cause)}",
                                      op=op) from cause
