"""onnxruntime on the CPU: loads a variant's .onnx file."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import Backend, BackendError, Session

# onnxruntime's type strings for the dtypes a portfolio uses; inputs are cast to these.
_NUMPY_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
_ERRORS_ONLY = 3  # onnxruntime's log severity: keep its optimizer warnings out of the agent's journal


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    file_format = "onnx"
    pip_package = "onnxruntime"

    def __init__(self, allow_spinning: bool = False) -> None:
        # Spinning threads keep cores busy between requests: an idle agent would heat a Pi for nothing.
        self.allow_spinning = allow_spinning

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    def session_options(self, threads: int | None = None):
        """The onnxruntime options every agent session runs with (benchmarks reuse them for a bare session)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's own choice
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = _ERRORS_ONLY
        spinning = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        return options

    def open(
        self,
        path: Path,
        variant_id: str,
        *,
        threads: int | None = None,
        manifest_layout: str | None = None,  # the .onnx file takes the manifest's layout as it is
        file_input_shape: list[int] | None = None,
    ) -> Session:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), self.session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's errors derive from Exception only
            raise BackendError(f"{path}: onnxruntime cannot load this file ({error})") from None
        return OnnxRuntimeSession(session, Path(path), variant_id)


class OnnxRuntimeSession(Session):
    def __init__(self, session: Any, path: Path, variant_id: str) -> None:
        self.path = path
        self.variant_id = variant_id
        self._session: Any | None = session
        self._input_names = [spec.name for spec in session.get_inputs()]
        self._input_dtypes = [_NUMPY_DTYPES.get(spec.type) for spec in session.get_inputs()]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        session = self._session  # a local reference keeps it alive through a concurrent close()
        if session is None:
            raise BackendError(f"{self.path}: session for variant '{self.variant_id}' is closed")
        if len(inputs) != len(self._input_names):
            raise BackendError(
                f"{self.path}: variant '{self.variant_id}' takes {len(self._input_names)} input(s), "
                f"got {len(inputs)}"
            )
        feed = {
            name: np.asarray(array, dtype=dtype)
            for name, dtype, array in zip(self._input_names, self._input_dtypes, inputs)
        }
        try:
            return list(session.run(None, feed))
        except Exception as error:
            raise BackendError(f"{self.path}: onnxruntime failed on variant '{self.variant_id}' ({error})") from None

    def close(self) -> None:
        self._session = None
