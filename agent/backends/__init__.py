"""Inference backends: one small interface, and a registry that finds every backend in this package.

A backend is one module in this package defining a concrete `Backend` subclass; nothing else needs
to change. Backend modules import their runtime (onnxruntime, TFLite, ...) only when asked to, so
importing this package stays light and never fails for lack of a runtime.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

__all__ = ["Backend", "BackendError", "Session", "available_backends", "get_backend", "known_backends"]


class BackendError(RuntimeError):
    """A model file that cannot be loaded or run, or a backend that is unknown or not installed."""


class Session(ABC):
    """One loaded variant, ready to answer. Safe to call from several threads at once."""

    variant_id: str
    path: Path
    provider: str | None = None  # the execution provider that runs it; None: the runtime has no choice

    @abstractmethod
    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The model's outputs for `inputs`, given in the manifest's layout and dtype, any batch size >= 1."""

    def bound(self, into: dict[int, np.ndarray], fixed: dict[int, np.ndarray] | None = None
              ) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
        """A run() for repeated calls: output i is written into the array into[i] and input i is always
        fixed[i]; the function returned takes the other inputs and returns the other outputs, in order. An
        array both fixed and into is one buffer: a runtime that binds memory (onnxruntime) updates it in
        place and sets up once what the calls share; here each call runs run() and copies the outputs in."""
        fixed = fixed or {}

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            given = iter(inputs)
            outputs = self.run([fixed[index] if index in fixed else next(given)
                                for index in range(len(fixed) + len(inputs))])
            for index, array in into.items():
                np.copyto(array, outputs[index])
            return [output for index, output in enumerate(outputs) if index not in into]

        return run

    @abstractmethod
    def close(self) -> None:
        """Release the runtime's resources; a later run() raises BackendError."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Backend(ABC):
    name: str  # e.g. "onnxruntime"; what configuration files and get_backend() use
    file_format: str  # which of a variant's files it loads: "onnx" | "tflite"
    pip_package: str  # what to install when the runtime is missing
    # Where the runtime can run a variant, best first (onnxruntime's execution providers); the agent
    # serves each variant on the first one that loads it and passes its health check. (None,): no choice.
    providers: tuple[str | None, ...] = (None,)

    @staticmethod
    @abstractmethod
    def available() -> bool:
        """Whether the runtime can run on this machine."""

    @classmethod
    def unavailable_reason(cls) -> str:
        """One line on why available() is false here, and what to install."""
        return f"backend '{cls.name}' is not installed on this machine: pip install {cls.pip_package}"

    @abstractmethod
    def open(
        self,
        path: Path,
        variant_id: str,
        *,
        threads: int | None = None,
        manifest_layout: str | None = None,
        file_input_shape: list[int] | None = None,
        provider: str | None = None,
        spin: bool = False,
    ) -> Session:
        """Load the model file at `path` to run on `provider` (one of `providers`; None: the first);
        BackendError (naming the path) if it cannot be loaded. `spin`: the runtime's threads may
        busy-wait between the parallel sections of a run (not after it), for runs that come back to back
        while nothing else of the agent needs a core, as a generation's decode steps."""

    def use_providers(self, preferred: Sequence[str], state_dir: Path | None = None) -> None:
        """Try these providers, best first, where installed; state_dir keeps what they build (engines).
        A runtime without providers ignores them."""


_registry: dict[str, type[Backend]] | None = None
_registry_lock = threading.Lock()


def _backends_in(module: ModuleType) -> list[type[Backend]]:
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Backend)
        and value.__module__ == module.__name__
        and not getattr(value, "__abstractmethods__", None)
    ]


def _discover() -> dict[str, type[Backend]]:
    global _registry
    with _registry_lock:
        if _registry is None:
            found: dict[str, type[Backend]] = {}
            for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
                module = importlib.import_module(f"{__name__}.{module_info.name}")
                for backend_class in _backends_in(module):
                    found[backend_class.name] = backend_class
            _registry = found
        return _registry


def known_backends() -> list[str]:
    """Every backend this agent knows, installed or not."""
    return sorted(_discover())


def available_backends() -> list[str]:
    """The backends whose runtime is installed here."""
    return [name for name, backend_class in sorted(_discover().items()) if backend_class.available()]


def get_backend(name: str) -> Backend:
    backend_class = _discover().get(name)
    if backend_class is None:
        raise BackendError(f"unknown backend '{name}'; known backends: {', '.join(known_backends())}")
    if not backend_class.available():
        raise BackendError(backend_class.unavailable_reason())
    return backend_class()
