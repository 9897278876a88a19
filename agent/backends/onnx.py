"""onnxruntime: loads a variant's .onnx file, on the best execution provider that takes it.

A session for provider P also lists the providers after P in the chain: onnxruntime gives them the
nodes P cannot run. The provider a session reports is the first one onnxruntime actually registered.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import Backend, BackendError, Session
from agent.backends.providers import (CPU, ENGINE_CACHE_DIR, TENSORRT, installed_providers, provider_chain,
                                     provider_options)

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

    def __init__(self, *, installed: Sequence[str] | None = None,
                 create_session: Callable[..., Any] | None = None) -> None:
        """`installed` replaces onnxruntime's own list of providers and `create_session` its
        InferenceSession (both for tests)."""
        self.providers: tuple[str, ...] = (CPU,)
        self.engine_cache_dir: Path | None = None
        self._installed = installed
        self._create_session = create_session or inference_session

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    def session_options(self, threads: int | None = None, spin: bool = False):
        """The onnxruntime options every agent session runs with (benchmarks reuse them for a bare session).

        The intra-op threads sleep between parallel sections, or with `spin` spin while a run lasts; never
        after it (onnxruntime's default spins on for tens of milliseconds, heating an idle board)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's own choice
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = _ERRORS_ONLY
        spinning = "1" if spin else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    def open(
        self,
        path: Path,
        variant_id: str,
        *,
        threads: int | None = None,
        manifest_layout: str | None = None,  # the .onnx file takes the manifest's layout as it is
        file_input_shape: list[int] | None = None,
        provider: str | None = None,
        spin: bool = False,
    ) -> Session:
        if provider is not None and provider not in self.providers:
            raise BackendError(f"{path}: {provider} is not among this agent's providers ({', '.join(self.providers)})")
        chain = self.providers[self.providers.index(provider):] if provider is not None else self.providers
        try:
            session = self._create_session(str(path), self.session_options(threads, spin), list(chain),
                                           [provider_options(name, self.engine_cache_dir) for name in chain])
        except Exception as error:  # onnxruntime's errors derive from Exception only
            on = "" if chain[0] == CPU else f" on {chain[0]}"
            raise BackendError(f"{path}: onnxruntime cannot load this file{on} ({error})") from None
        return OnnxRuntimeSession(session, Path(path), variant_id)

    def use_providers(self, preferred: Sequence[str], state_dir: Path | None = None) -> None:
        installed = installed_providers() if self._installed is None else self._installed
        self.providers = tuple(provider_chain(preferred, installed))
        self.engine_cache_dir = None
        if TENSORRT in self.providers and state_dir is not None:
            self.engine_cache_dir = state_dir / ENGINE_CACHE_DIR
            self.engine_cache_dir.mkdir(parents=True, exist_ok=True)


class OnnxRuntimeSession(Session):
    def __init__(self, session: Any, path: Path, variant_id: str) -> None:
        self.path = path
        self.variant_id = variant_id
        self._session: Any | None = session
        self.provider = session.get_providers()[0]
        self._input_names = [spec.name for spec in session.get_inputs()]
        self._input_dtypes = [_NUMPY_DTYPES.get(spec.type) for spec in session.get_inputs()]
        self._input_shapes = [spec.shape for spec in session.get_inputs()]
        self._outputs = [(spec.name, spec.shape, _NUMPY_DTYPES.get(spec.type)) for spec in session.get_outputs()]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        session, feed = self._open(), self._feed(inputs)
        try:
            return list(session.run(None, feed))
        except Exception as error:
            raise BackendError(f"{self.path}: onnxruntime failed on variant '{self.variant_id}' ({error})") from None

    def bound(self, into: dict[int, np.ndarray], fixed: dict[int, np.ndarray] | None = None
              ) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
        """On the CPU, one IOBinding for every call: the fixed inputs and into's outputs are bound once,
        where they lie, so an array that is both is one buffer to the model (a shared KV cache, written in
        place); a call binds only its own inputs, and the other outputs go to new arrays sized from the
        inputs' named dimensions. Another provider would copy host memory to its device and back anyway,
        and an output sized by no input needs onnxruntime to allocate it: run() and a copy."""
        fixed = fixed or {}
        others = [index for index in range(len(self._outputs)) if index not in into]
        sizes = {index: self._sized_by_inputs(index) for index in others}
        if self.provider != CPU or any(size is None for size in sizes.values()):
            return super().bound(into, fixed)
        for index, array in into.items():
            if not (array.flags.c_contiguous and array.flags.writeable) or array.dtype != np.float32:
                raise BackendError(f"{self.path}: output {index} must go to a writable, contiguous float32 array")
        binding = self._open().io_binding()
        for index, array in into.items():
            binding.bind_output(self._outputs[index][0], "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        read = {index: np.ascontiguousarray(array, dtype=self._input_dtypes[index]) for index, array in fixed.items()}
        for index, array in read.items():  # `read` keeps every array the binding reads alive
            binding.bind_cpu_input(self._input_names[index], array)
        free = [index for index in range(len(self._input_names)) if index not in fixed]

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            session = self._open()
            if len(inputs) != len(free):
                raise BackendError(f"{self.path}: variant '{self.variant_id}' takes {len(free)} input(s) besides "
                                   f"the bound ones, got {len(inputs)}")
            outputs = []
            try:
                for index, array in zip(free, inputs):
                    read[index] = np.ascontiguousarray(array, dtype=self._input_dtypes[index])
                    binding.bind_cpu_input(self._input_names[index], read[index])
                for index in others:  # new arrays each call: the caller keeps the last ones
                    name, _, dtype = self._outputs[index]
                    shape = [size if axis is None else read[size].shape[axis] for size, axis in sizes[index]]
                    outputs.append(np.empty(shape, dtype))
                    binding.bind_output(name, "cpu", 0, dtype, shape, outputs[-1].ctypes.data)
                session.run_with_iobinding(binding)
            except Exception as error:
                raise BackendError(f"{self.path}: onnxruntime failed on variant '{self.variant_id}' ({error})") from None
            return outputs

        return run

    def _sized_by_inputs(self, output: int) -> list[tuple[int, int | None]] | None:
        """How to size output `output` from a call's inputs, as (input, axis) per dimension, (size, None) for a
        fixed one; None when a dimension is named by no input."""
        _, shape, dtype = self._outputs[output]
        if dtype is None:
            return None
        named = {dim: (index, axis) for index, dims in reversed(list(enumerate(self._input_shapes)))
                 for axis, dim in enumerate(dims) if isinstance(dim, str)}
        sizes = [named.get(dim) if isinstance(dim, str) else (dim, None) for dim in shape]
        return None if any(size is None or size == (None, None) for size in sizes) else sizes

    def _open(self) -> Any:
        session = self._session  # a local reference keeps it alive through a concurrent close()
        if session is None:
            raise BackendError(f"{self.path}: session for variant '{self.variant_id}' is closed")
        return session

    def _feed(self, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        if len(inputs) != len(self._input_names):
            raise BackendError(
                f"{self.path}: variant '{self.variant_id}' takes {len(self._input_names)} input(s), "
                f"got {len(inputs)}"
            )
        return {
            name: np.asarray(array, dtype=dtype)
            for name, dtype, array in zip(self._input_names, self._input_dtypes, inputs)
        }

    def close(self) -> None:
        self._session = None


def inference_session(path: str, options: Any, providers: list[str], options_per_provider: list[dict]) -> Any:
    import onnxruntime as ort

    # onnxruntime's own fallback would move a session to another provider silently (printing to
    # stdout): the agent falls back itself, variant by variant, and says so in an event.
    session = ort.InferenceSession(path, options, providers=providers, provider_options=options_per_provider,
                                   enable_fallback=0)
    session.disable_fallback()  # releases before enable_fallback= only know this switch
    return session
