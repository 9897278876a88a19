"""Export a torch image classifier to ONNX and TFLite, and check each export against torch.

Every export is run on the same check inputs as the torch model; the max abs difference is
returned (it goes into the manifest) and an export above tolerance raises ExportError.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from exporter.errors import ExportError

T = TypeVar("T")

ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "logits"
_OUTPUT_TAIL_LINES = 20
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def export_onnx(model: nn.Module, check_inputs: torch.Tensor, path: Path, *, atol: float = 1e-4) -> float:
    """Export `model` to ONNX with a dynamic batch dimension and return its max abs difference from torch.

    The file has one input "input" [batch, C, H, W] and one output "logits". It is checked in
    onnxruntime on the whole of `check_inputs` at once and on its first sample alone (batch 1).
    """
    path = Path(path)
    _require_image_batch(check_inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        expected = _torch_outputs(model, check_inputs)

        def export() -> None:
            torch.onnx.export(
                model,
                (check_inputs,),
                str(path),
                dynamo=True,  # the legacy exporter was seen silently wrong on BERT
                external_data=False,
                input_names=[ONNX_INPUT_NAME],
                output_names=[ONNX_OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                verbose=False,
            )

        run_quietly(
            "ONNX export",
            path,
            export,
            hint="check that torch.export can trace the model (no data-dependent control flow)",
        )

    session = run_quietly(
        "loading the exported ONNX model",
        path,
        lambda: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
        hint="re-run the export; the file may be incomplete",
    )
    batch_dim = session.get_inputs()[0].shape[0]
    if not isinstance(batch_dim, str):
        raise ExportError(
            f"ONNX export at {path} has a fixed batch size {batch_dim}, not a dynamic one: "
            "check that the model has no batch-size-dependent reshapes"
        )
    inputs = check_inputs.detach().cpu().numpy()

    def run_onnx(batch: np.ndarray) -> np.ndarray:
        return session.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: batch})[0]

    hint = "the exported graph may not accept this batch size"
    whole_batch = run_quietly("running the ONNX model", path, lambda: run_onnx(inputs), hint=hint)
    first_alone = run_quietly("running the ONNX model at batch 1", path, lambda: run_onnx(inputs[:1]), hint=hint)
    return max(
        check_outputs(expected, whole_batch, atol, path, runtime="ONNX"),
        check_outputs(expected[:1], first_alone, atol, path, runtime="ONNX (batch 1)"),
    )


def export_tflite(model: nn.Module, check_inputs: torch.Tensor, path: Path, *, atol: float = 1e-4) -> float:
    """Convert `model` to TFLite at batch 1 (NCHW kept) and return its max abs difference from torch.

    Each sample of `check_inputs` is run through the interpreter one by one.
    """
    path = Path(path)
    _require_image_batch(check_inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        expected = _torch_outputs(model, check_inputs)

        def convert() -> None:
            try:
                import litert_torch
            except ImportError as error:
                raise ExportError(
                    "TFLite export needs litert-torch: pip install 'edgeshift[export]'"
                ) from error
            litert_torch.convert(model, (check_inputs[:1],)).export(str(path))

        run_quietly(
            "TFLite conversion",
            path,
            convert,
            hint="check that litert-torch supports every op in the model",
        )

    inputs = check_inputs.detach().cpu().numpy()
    actual = run_quietly("running the TFLite model", path, lambda: run_tflite(path, inputs), hint="re-run the export")
    return check_outputs(expected, actual, atol, path, runtime="TFLite")


def run_tflite(path: Path, inputs: np.ndarray, num_threads: int | None = None) -> np.ndarray:
    """Outputs of a batch-1 .tflite file with float32 input and output, one sample at a time."""
    interpreter = load_tflite_interpreter(path, num_threads=num_threads)
    (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()
    if given["dtype"] != np.float32 or taken["dtype"] != np.float32:
        raise ExportError(f"{path} takes {np.dtype(given['dtype']).name} and returns {np.dtype(taken['dtype']).name}, "
                          "not float32")
    outputs = []
    for sample in np.ascontiguousarray(inputs, dtype=np.float32):
        interpreter.set_tensor(given["index"], sample[np.newaxis])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(taken["index"]).copy())
    return np.concatenate(outputs)


def tflite_input_shape(path: Path) -> list[int]:
    """The interpreter's input shape, e.g. [1, 3, 32, 32]."""
    interpreter = load_tflite_interpreter(path)
    return [int(size) for size in interpreter.get_input_details()[0]["shape"]]


def load_tflite_interpreter(path: Path, num_threads: int | None = None) -> Any:
    """A TFLite interpreter for `path` with tensors allocated, from ai_edge_litert or else tflite_runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as error:
            raise ExportError(
                "no TFLite runtime found: pip install ai-edge-litert (or tflite-runtime)"
            ) from error

    def load() -> Any:
        interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        interpreter.allocate_tensors()
        return interpreter

    return run_quietly("loading the TFLite model", Path(path), load, hint="check that the file is a TFLite model")


def check_outputs(torch_out: np.ndarray, other_out: np.ndarray, atol: float, path: Path, *, runtime: str = "export",
                  relative: bool = True) -> float:
    """Max abs difference between torch's outputs and an export's; ExportError above tolerance.

    The tolerance is atol * max(1, max |torch output|), so large logits are judged relatively;
    with relative=False it is atol itself.
    """
    if torch_out.shape != other_out.shape:
        raise ExportError(
            f"{runtime} output shape {list(other_out.shape)} differs from torch's {list(torch_out.shape)} "
            f"for {path}: re-export and check the model's output"
        )
    if not np.isfinite(torch_out).all():
        raise ExportError(f"torch outputs NaN or inf on the check inputs for {path}: fix the model or its inputs")
    if torch_out.size == 0:
        return 0.0
    diff = float(np.max(np.abs(torch_out.astype(np.float64) - other_out.astype(np.float64))))
    tolerance = atol * max(1.0, float(np.max(np.abs(torch_out)))) if relative else atol
    if not diff <= tolerance:  # also catches a NaN difference
        raise ExportError(
            f"{runtime} output differs from torch by {diff:.3g} > tolerance {tolerance:.3g} for {path}: "
            "the export is wrong; inspect the file, or raise atol if this difference is expected"
        )
    return diff


def _require_image_batch(check_inputs: torch.Tensor) -> None:
    if not isinstance(check_inputs, torch.Tensor) or check_inputs.dim() != 4 or len(check_inputs) == 0:
        raise ExportError("check inputs must be a non-empty float32 tensor [N, C, H, W]: pass a batch of images")
    if check_inputs.dtype != torch.float32:
        raise ExportError(f"check inputs are {check_inputs.dtype}, not float32: convert them with .float()")


def _torch_outputs(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        outputs = model(inputs)
    if not isinstance(outputs, torch.Tensor):
        raise ExportError(f"model returned {type(outputs).__name__}, not one logits tensor: wrap it to return logits")
    return outputs.detach().cpu().numpy()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode for the export, and give it back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class _CapturedOutput:
    text: str = ""

    def tail(self) -> str:
        lines = [line for line in self.text.splitlines() if line.strip()]
        return "\n".join(lines[-_OUTPUT_TAIL_LINES:])


def run_quietly(action: str, path: Path, work: Callable[[], T], *, hint: str) -> T:
    """Run `work` with all its output captured; turn any failure into an ExportError."""
    captured = _CapturedOutput()
    try:
        with _silenced_output(captured):
            return work()
    except ExportError:
        raise
    except Exception as error:
        lines = _ANSI_ESCAPE.sub("", str(error)).strip().splitlines()
        reason = lines[0].rstrip(" :") if lines else ""
        message = f"{action} failed for {path}: {type(error).__name__}: {reason}; {hint}"
        if captured.tail():
            message += f"\ncaptured output:\n{captured.tail()}"
        raise ExportError(message) from error


@contextlib.contextmanager
def _silenced_output(captured: _CapturedOutput) -> Iterator[None]:
    """Send everything written to stdout and stderr into `captured`, from Python and from C++ alike.

    The exporters print progress both from Python and from native code, so the redirect is done on
    file descriptors 1 and 2. This is process-wide: do not export from several threads at once.
    """
    _flush_all()
    with tempfile.TemporaryFile() as sink:
        saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
        # Python's writes share the sink's file offset, so they stay in order with native ones.
        python_sink = open(os.dup(sink.fileno()), "w", buffering=1, errors="replace")
        try:
            for fd in saved_fds:
                os.dup2(sink.fileno(), fd)
            with (
                contextlib.redirect_stdout(python_sink),
                contextlib.redirect_stderr(python_sink),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                yield
        finally:
            _flush_all()
            python_sink.close()
            for fd, saved in saved_fds.items():
                os.dup2(saved, fd)
                os.close(saved)
            sink.seek(0)
            captured.text = _ANSI_ESCAPE.sub("", sink.read().decode(errors="replace"))


def _flush_all() -> None:
    """Flush Python's and C's stdio buffers so nothing written inside the redirect leaks out after it."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)
