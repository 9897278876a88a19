"""TFLite (LiteRT) on the CPU: loads a variant's .tflite file.

The exported files have a fixed batch of 1. A batch of N is run by resizing the interpreter's
inputs to N when the batch size changes: as fast as N single invocations on one thread, faster on
two (1.3x at batch 8, 1.7x at batch 32 for the small ResNet). Should a file refuse the resize, or
answer with another batch size than asked, the session runs sample by sample from then on.

The runtime is ai-edge-litert, else tflite-runtime. tflite-runtime before 2.18 (every release on
PyPI: the last is 2.14.0) was built against numpy 1: under numpy 2 it imports, then fails on every
model with "_ARRAY_API not found" (on stderr only), so the probe reports that pairing unavailable,
with the fix, before any model is loaded.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import Backend, BackendError, Session

# From the manifest's layout to the other one, for 4-D image inputs.
_TO_OTHER_LAYOUT = {"NCHW": (0, 2, 3, 1), "NHWC": (0, 3, 1, 2)}


@dataclass(frozen=True)
class _Runtime:
    """The interpreter class found here; or None, with why when a runtime is installed but cannot run."""

    interpreter_class: Any | None
    problem: str | None = None


# The first TensorFlow release built against numpy 2; tflite_runtime carries TensorFlow's version.
_FIRST_NUMPY_2_BUILD = (2, 18)
_NUMPY_1_FIX = 'pip install "numpy<2", or pip install ai-edge-litert'


@functools.lru_cache(maxsize=None)
def _runtime() -> _Runtime:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return _Runtime(Interpreter)
    except ImportError:
        pass
    try:
        import tflite_runtime
        from tflite_runtime.interpreter import Interpreter
    except Exception as error:  # under numpy 2 its import can also fail, in several ways
        if isinstance(error, ModuleNotFoundError) and error.name == "tflite_runtime":
            return _Runtime(None)
        if _numpy_major_version() >= 2:
            return _Runtime(None, f"tflite_runtime does not import under numpy {np.__version__}: {_NUMPY_1_FIX}")
        return _Runtime(None, f"tflite_runtime does not import ({_one_line(error)}): pip install ai-edge-litert")
    version = getattr(tflite_runtime, "__version__", "unknown")
    if _numpy_major_version() >= 2 and _major_minor(version) < _FIRST_NUMPY_2_BUILD:
        return _Runtime(None, (
            f"tflite_runtime {version} was built for numpy 1 and cannot run with numpy {np.__version__} "
            f'(every model would fail to load with "_ARRAY_API not found"): {_NUMPY_1_FIX}'
        ))
    return _Runtime(Interpreter)


def _numpy_major_version() -> int:
    return int(np.__version__.split(".")[0])


def _major_minor(version: str) -> tuple[int, int]:
    """(2, 14) for "2.14.0"; (0, 0) when unreadable, which counts as old."""
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return 0, 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class TfliteBackend(Backend):
    name = "tflite"
    file_format = "tflite"
    pip_package = "ai-edge-litert (or tflite-runtime, which needs numpy<2)"

    @staticmethod
    def available() -> bool:
        return _runtime().interpreter_class is not None

    @classmethod
    def unavailable_reason(cls) -> str:
        problem = _runtime().problem
        if problem is None:
            return super().unavailable_reason()
        return f"backend '{cls.name}' cannot run on this machine: {problem}"

    def open(
        self,
        path: Path,
        variant_id: str,
        *,
        threads: int | None = None,
        manifest_layout: str | None = None,
        file_input_shape: list[int] | None = None,
        provider: str | None = None,  # LiteRT has no providers to choose from
        spin: bool = False,  # nor a choice of how its threads wait
    ) -> Session:
        interpreter_class = _runtime().interpreter_class
        if interpreter_class is None:
            raise BackendError(f"{path}: {self.unavailable_reason()}")
        try:
            interpreter = interpreter_class(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
        except Exception as error:
            if "_ARRAY_API" in str(error) or "multiarray failed to import" in str(error):
                raise BackendError(f"{path}: the TFLite runtime needs numpy<2 ({error}): {_NUMPY_1_FIX}") from None
            raise BackendError(f"{path}: the TFLite runtime cannot load this file ({error})") from None
        actual_shape = [int(size) for size in interpreter.get_input_details()[0]["shape"]]
        if file_input_shape is not None and list(file_input_shape) != actual_shape:
            raise BackendError(
                f"{path}: the manifest gives input shape {list(file_input_shape)} but the file has "
                f"{actual_shape}; re-export the portfolio"
            )
        return TfliteSession(interpreter, Path(path), variant_id, manifest_layout)


class TfliteSession(Session):
    def __init__(self, interpreter: Any, path: Path, variant_id: str, manifest_layout: str | None) -> None:
        self.path = path
        self.variant_id = variant_id
        self._interpreter: Any | None = interpreter
        self._manifest_layout = manifest_layout
        self._lock = threading.Lock()  # an interpreter must not be entered by two threads
        input_details = interpreter.get_input_details()
        self._input_indices = [detail["index"] for detail in input_details]
        self._input_dtypes = [detail["dtype"] for detail in input_details]
        self._file_shapes = [tuple(int(size) for size in detail["shape"]) for detail in input_details]
        self._output_indices = [detail["index"] for detail in interpreter.get_output_details()]
        self._file_batch = self._file_shapes[0][0]
        self._current_batch: int | None = self._file_batch
        self._batch_by_resizing = True

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        arrays = self._in_file_form(inputs)
        with self._lock:
            interpreter = self._interpreter
            if interpreter is None:
                raise BackendError(f"{self.path}: session for variant '{self.variant_id}' is closed")
            try:
                return self._run_batch(interpreter, arrays)
            except Exception as error:
                raise BackendError(
                    f"{self.path}: the TFLite runtime failed on variant '{self.variant_id}' ({error})"
                ) from None

    def close(self) -> None:
        with self._lock:
            self._interpreter = None

    # ------------------------------------------------------------------ inputs

    def _in_file_form(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The inputs in the file's layout and dtype, contiguous, checked against the file's shapes."""
        if len(inputs) != len(self._file_shapes):
            raise BackendError(
                f"{self.path}: variant '{self.variant_id}' takes {len(self._file_shapes)} input(s), got {len(inputs)}"
            )
        arrays = []
        for position, (array, file_shape, dtype) in enumerate(zip(inputs, self._file_shapes, self._input_dtypes)):
            array = np.asarray(array)
            permutation = self._layout_permutation(position, array.shape, file_shape)
            if permutation is not None:
                array = array.transpose(permutation)
            arrays.append(np.ascontiguousarray(array, dtype=dtype))
        batch_sizes = {len(array) for array in arrays}
        if len(batch_sizes) != 1 or 0 in batch_sizes:
            raise BackendError(f"{self.path}: inputs need one common batch size >= 1, got {sorted(batch_sizes)}")
        return arrays

    def _layout_permutation(
        self, position: int, given: tuple[int, ...], file_shape: tuple[int, ...]
    ) -> tuple[int, ...] | None:
        """None when the input already matches the file; the transposition when only its layout differs."""
        if len(given) == len(file_shape) >= 1 and given[1:] == file_shape[1:]:
            return None
        permutation = _TO_OTHER_LAYOUT.get(self._manifest_layout or "")
        if permutation and len(given) == 4 == len(file_shape):
            if tuple(given[axis] for axis in permutation)[1:] == file_shape[1:]:
                return permutation
        raise BackendError(
            f"{self.path}: input {position} has shape {list(given)}, which does not fit the file's input "
            f"{list(file_shape)} (manifest layout {self._manifest_layout})"
        )

    # ------------------------------------------------------------------ running (lock held)

    def _run_batch(self, interpreter: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
        batch = len(arrays[0])
        if batch == self._file_batch:
            self._resize(interpreter, batch)
            return self._invoke(interpreter, arrays)
        if self._batch_by_resizing:
            outputs = self._try_resized(interpreter, arrays)
            if outputs is not None:
                return outputs
        return self._invoke_one_by_one(interpreter, arrays)

    def _try_resized(self, interpreter: Any, arrays: list[np.ndarray]) -> list[np.ndarray] | None:
        batch = len(arrays[0])
        try:
            self._resize(interpreter, batch)
            outputs = self._invoke(interpreter, arrays)
        except Exception:
            outputs = None
        if outputs is not None and all(output.shape[:1] == (batch,) for output in outputs):
            return outputs
        # The graph has a batch of 1 baked in somewhere: run sample by sample from now on.
        self._batch_by_resizing = False
        self._resize(interpreter, self._file_batch)
        return None

    def _resize(self, interpreter: Any, batch: int) -> None:
        if batch == self._current_batch:
            return
        self._current_batch = None  # unknown until the resize has fully succeeded
        for index, file_shape in zip(self._input_indices, self._file_shapes):
            interpreter.resize_tensor_input(index, [batch, *file_shape[1:]])
        interpreter.allocate_tensors()
        self._current_batch = batch

    def _invoke(self, interpreter: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for index, array in zip(self._input_indices, arrays):
            interpreter.set_tensor(index, array)
        interpreter.invoke()
        return [interpreter.get_tensor(index) for index in self._output_indices]  # get_tensor copies

    def _invoke_one_by_one(self, interpreter: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
        per_sample = [
            self._invoke(interpreter, [array[row : row + 1] for array in arrays]) for row in range(len(arrays[0]))
        ]
        return [np.concatenate(outputs) for outputs in zip(*per_sample)]
