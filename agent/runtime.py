"""The serving core: variants resident per a preload setting, atomic hot-swap, thread-safe inference.

A request takes a reference to the active variant once, at its start, and finishes on it; a
swap only replaces that reference, so no request fails or is dropped while variants change.
A retired variant is closed when its last in-flight request returns (or kept, per preload).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from agent.backends import Backend, BackendError, Session
from agent.kv_cache import CachedLmSession, cache_inputs, in_place, shared_inputs
from agent.manifest import KvCache
from agent.portfolio import Portfolio, TensorSpec, Variant
from agent.stats import LatencyWindow

PRELOAD_MODES = ("all", "neighbours", "lazy")


class InferenceError(ValueError):
    """A request that cannot be served as given (shape, dtype, batch); the agent keeps serving."""


@dataclass(frozen=True)
class InferResult:
    outputs: list[np.ndarray]
    variant: str
    latency_ms: float               # the model call
    answered_ms: float              # from the request's arrival where the caller stamped it, else the model call


@dataclass(frozen=True)
class SwitchRecord:
    previous: str
    active: str
    reason: str
    seconds: float          # time from the request to the swap (includes loading when lazy)


class _Resident:
    """A loaded variant and the requests currently running on it."""

    def __init__(self, variant_id: str, session: Session):
        self.variant_id = variant_id
        self.session = session
        self._in_flight = 0
        self._retired = False
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self._retired:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            close = self._retired and self._in_flight == 0
        if close:
            self.session.close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._in_flight == 0
        if close:
            self.session.close()


class HeldVariant:
    """One variant kept for a sequence of requests (a generation's steps): swaps go on meanwhile,
    and the variant stays loaded until the hold ends."""

    def __init__(self, runtime: Runtime, resident: _Resident):
        self._runtime = runtime
        self._resident = resident

    @property
    def variant(self) -> str:
        return self._resident.variant_id

    def infer(self, inputs: np.ndarray | list[np.ndarray]) -> InferResult:
        return self._runtime._run(self._resident, self._runtime.validate(inputs))

    @property
    def kv_cache(self) -> KvCache | None:
        """The variant file's key-value cache, None when it scores whole sequences only."""
        return self._runtime.kv_cache(self.variant)

    def infer_cached(self, ids: np.ndarray, past: list[np.ndarray]) -> InferResult:
        """Tokens `ids` [batch, n] after the cached `past` (the presents of the call before, or an empty
        cache): outputs are the new positions' logits, then every layer's present key and value."""
        runtime = self._runtime
        context = runtime.manifest.language_model.context_length
        if past[0].shape[2] + ids.shape[1] > context:
            raise InferenceError(f"{past[0].shape[2]} cached and {ids.shape[1]} new tokens are more than the model's "
                                 f"context of {context}")
        _check_token_ids(ids, "input_ids", vocab_size(runtime.manifest.outputs[0]), context)
        return runtime._run(self._resident, cache_inputs(ids, past))

    def in_place(self, buffers: list[np.ndarray], logits: np.ndarray | None = None
                 ) -> Callable[[np.ndarray, int], InferResult]:
        """infer(ids, filled): tokens `ids` [batch, n] after the first `filled` positions of a shared cache's
        `buffers` (agent.kv_cache.shared_cache), which receive the new positions in place; outputs are
        [logits], or [] when they go to `logits` (agent.kv_cache.in_place). The arrays are bound to the
        session once, for every call."""
        runtime = self._runtime
        length, context = buffers[0].shape[2], runtime.manifest.language_model.context_length
        vocab = vocab_size(runtime.manifest.outputs[0])
        run = in_place(self._resident.session, buffers, logits)

        def infer(ids: np.ndarray, filled: int) -> InferResult:
            if filled + ids.shape[1] > min(length, context):
                raise InferenceError(f"{filled} cached and {ids.shape[1]} new tokens are more than the cache's "
                                     f"{length} positions or the model's context of {context}")
            _check_token_ids(ids, "input_ids", vocab, context)
            return runtime._run(self._resident, shared_inputs(ids, filled), run)

        return infer


class Runtime:
    """Serve a portfolio's healthy variants through one backend, each on its provider (agent.placement)."""

    def __init__(self, portfolio: Portfolio, backend: Backend, threads: int | None = None, preload: str = "all",
                 max_batch: int = 64, variants: list[str] | None = None,
                 providers: dict[str, str | None] | None = None):
        if preload not in PRELOAD_MODES:
            raise ValueError(f"preload must be one of {', '.join(PRELOAD_MODES)}, got {preload!r}")
        self.portfolio = portfolio
        self.manifest = portfolio.manifest
        self.backend = backend
        self.threads = threads
        self.preload = preload
        self.max_batch = max_batch
        self.variant_ids = variants if variants is not None else [v.id for v in self.manifest.variants]
        self.providers = dict(providers or {})  # variant -> provider; absent: the backend's first
        self.windows = {vid: LatencyWindow() for vid in self.variant_ids}
        self._resident: dict[str, _Resident] = {}
        self._active: _Resident | None = None
        self._swap_lock = threading.Lock()
        self.activated_at = time.monotonic()
        self.served = 0

    # ----------------------------------------------------------------- loading

    def open_session(self, variant_id: str, provider: str | None = None) -> Session:
        """A new session of the variant, on `provider`, else on the one placed for it."""
        # Its threads spin within a run for language models only. A generation's decode steps come back to
        # back, ~300 parallel sections each, and a sleeping thread costs a wake-up at every one: int4
        # SmolLM2 at 2 threads decoded at 0.65x onnxruntime-genai's rate, 1.0x spinning. Other requests
        # arrive while the agent's own threads (HTTP, monitor, a load generator) need a core that a spinning
        # thread holds: make demo (200 requests/s, 2 cores) fell from 92.8% to 76.5% within its SLO.
        variant = self.manifest.variant(variant_id)
        fmt = self.backend.file_format
        if fmt not in variant.files:
            raise BackendError(f"variant {variant_id} has no {fmt} file for the {self.backend.name} backend")
        session = self.backend.open(self.portfolio.file_path(variant_id, fmt), variant_id, threads=self.threads,
                                    manifest_layout=self.manifest.inputs[0].layout,
                                    file_input_shape=variant.files[fmt].input_shape,
                                    provider=provider or self.providers.get(variant_id),
                                    spin=self.manifest.task == "causal-lm")
        cache = variant.files[fmt].kv_cache
        return session if cache is None else CachedLmSession(session, cache)

    def kv_cache(self, variant_id: str) -> KvCache | None:
        entry = self.manifest.variant(variant_id).files.get(self.backend.file_format)
        return None if entry is None else entry.kv_cache

    def start(self, variant_id: str) -> None:
        """Load the first active variant (and, per preload, the others)."""
        with self._swap_lock:
            self._active = self._load(variant_id)
            self.activated_at = time.monotonic()
            self._apply_preload(variant_id)

    def _load(self, variant_id: str) -> _Resident:
        if variant_id not in self.variant_ids:
            raise KeyError(f"unknown or unhealthy variant '{variant_id}'; serving: {', '.join(self.variant_ids)}")
        resident = self._resident.get(variant_id)
        if resident is None:
            resident = _Resident(variant_id, self.open_session(variant_id))
            self._resident[variant_id] = resident
        return resident

    def _apply_preload(self, active_id: str) -> None:
        wanted = set(self._wanted_resident(active_id))
        for vid in wanted:
            self._load(vid)
        for vid in [v for v in self._resident if v not in wanted]:
            self._resident.pop(vid).retire()

    def _wanted_resident(self, active_id: str) -> list[str]:
        if self.preload == "all":
            return list(self.variant_ids)
        if self.preload == "lazy":
            return [active_id]
        i = self.variant_ids.index(active_id)
        return self.variant_ids[max(0, i - 1):i + 2]

    # ----------------------------------------------------------------- serving

    @property
    def active(self) -> str:
        return self._active.variant_id if self._active is not None else ""

    def resident(self) -> list[str]:
        return list(self._resident)

    def switch(self, variant_id: str, reason: str) -> SwitchRecord:
        started = time.perf_counter()
        with self._swap_lock:
            previous = self.active
            if variant_id != previous:
                self._active = self._load(variant_id)  # loads outside any request's path
                self.activated_at = time.monotonic()
                self._apply_preload(variant_id)
        return SwitchRecord(previous, variant_id, reason, time.perf_counter() - started)

    def infer(self, inputs: np.ndarray | list[np.ndarray], arrived: float | None = None) -> InferResult:
        """One request on the active variant; `arrived` (time.monotonic()) stamps when it reached the caller."""
        arrays = self.validate(inputs)
        with self._entered() as resident:
            return self._run(resident, arrays, arrived=arrived)

    @contextmanager
    def hold(self) -> Iterator[HeldVariant]:
        """The active variant, kept for every request made through it until the block ends."""
        with self._entered() as resident:
            yield HeldVariant(self, resident)

    @contextmanager
    def _entered(self) -> Iterator[_Resident]:
        while True:
            resident = self._active
            if resident is None:
                raise RuntimeError("the runtime has not been started")
            if resident.enter():
                break  # retired between the read and enter: read the new active one
        try:
            yield resident
        finally:
            resident.leave()

    def _run(self, resident: _Resident, arrays: list[np.ndarray],
             run: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
             arrived: float | None = None) -> InferResult:
        """One request on a resident the caller has entered, through `run` (a Session.bound call of its
        session, `arrays` the inputs it takes) or its session's run(); its latency counts toward the
        variant's window."""
        started = time.perf_counter()
        try:
            outputs = (run or resident.session.run)(arrays)
        except Exception:
            self.windows[resident.variant_id].add_error()
            raise
        latency_ms = (time.perf_counter() - started) * 1000
        now = time.monotonic()
        answered_ms = latency_ms if arrived is None else (now - arrived) * 1000
        self.windows[resident.variant_id].add(latency_ms, now, answered_ms)
        self.served += 1
        return InferResult(outputs, resident.variant_id, latency_ms, answered_ms)

    def validate(self, inputs: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
        arrays = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
        specs = self.manifest.inputs
        if len(arrays) != len(specs):
            raise InferenceError(f"expected {len(specs)} input(s) ({', '.join(s.name for s in specs)}), got {len(arrays)}")
        batch = None
        for array, spec in zip(arrays, specs):
            _check_tensor(array, spec)
            if batch is not None and array.shape[0] != batch:
                raise InferenceError(f"all inputs must have the same batch size, got {batch} and {array.shape[0]}")
            batch = array.shape[0]
        if not 1 <= batch <= self.max_batch:
            raise InferenceError(f"batch size must be between 1 and {self.max_batch}, got {batch}")
        if self.manifest.language_model is not None:
            _check_token_ids(arrays[0], specs[0].name, vocab_size(self.manifest.outputs[0]),
                             self.manifest.language_model.context_length)
        return [np.ascontiguousarray(a) for a in arrays]

    def close(self) -> None:
        with self._swap_lock:
            for resident in self._resident.values():
                resident.retire()
            self._resident.clear()
            self._active = None


def _check_tensor(array: np.ndarray, spec: TensorSpec) -> None:
    if not isinstance(array, np.ndarray):
        raise InferenceError(f"input '{spec.name}' must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.dtype(spec.dtype):
        what = " token ids" if spec.dtype == "int64" else ""
        raise InferenceError(f"input '{spec.name}' must be {spec.dtype}{what}, got {array.dtype}")
    expected = spec.shape
    if array.ndim != len(expected) or any(e != -1 and e != a for e, a in zip(expected[1:], array.shape[1:])):
        shown = ["N" if d == -1 else str(d) for d in expected]
        raise InferenceError(f"input '{spec.name}' must have shape [{', '.join(shown)}], got {list(array.shape)}")
    if 0 in array.shape[1:]:
        raise InferenceError(f"input '{spec.name}' is empty (shape {list(array.shape)})")


def vocab_size(logits: TensorSpec) -> int | None:
    """How many tokens a causal LM's logits cover (their last dimension), None when dynamic."""
    return logits.shape[-1] if logits.shape and logits.shape[-1] > 0 else None


def _check_token_ids(ids: np.ndarray, name: str, vocab: int | None, context_length: int) -> None:
    if ids.shape[-1] > context_length:
        raise InferenceError(f"input '{name}' has {ids.shape[-1]} tokens, more than the model's context of "
                             f"{context_length}; send the last {context_length}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        bound = f"[0, {vocab})" if vocab is not None else ">= 0"
        raise InferenceError(f"input '{name}' must hold token ids in {bound}, got {bad}")


def health_check(runtime: Runtime, variant: Variant, sample_inputs: list[np.ndarray], expected: np.ndarray) -> str | None:
    """Why a variant must not serve (its outputs differ from the exporter's), or None if it is healthy."""
    try:
        session = runtime.open_session(variant.id)
    except (BackendError, KeyError, OSError) as error:
        return f"cannot load: {error}"
    try:
        return session_problem(session, variant, runtime.backend.file_format, sample_inputs, expected)
    finally:
        session.close()


def session_problem(session: Session, variant: Variant, fmt: str, sample_inputs: list[np.ndarray],
                    expected: np.ndarray) -> str | None:
    """Why this session of a variant must not serve, from its answer to the health-check samples."""
    try:
        got = session.run(sample_inputs)[0]
    except Exception as error:  # a runtime that crashes on the sample is broken, whatever the reason
        return f"fails on the health-check samples: {type(error).__name__}: {error}"
    if got.shape != expected.shape:
        return f"output shape {list(got.shape)} differs from the expected {list(expected.shape)}"
    tolerance = max(1e-3 * max(1.0, float(np.abs(expected).max())), 10 * variant.files[fmt].max_abs_diff)
    diff = float(np.abs(got - expected).max())
    if not diff <= tolerance:
        return f"outputs differ from the exporter's by {diff:.2e} (tolerance {tolerance:.1e})"
    return None


def memory_estimate_mb(variant: Variant, fmt: str) -> float:
    """Resident size of a loaded variant, estimated from its file (weights dominate)."""
    entry = variant.files.get(fmt) or next(iter(variant.files.values()))
    return entry.bytes / 2**20
