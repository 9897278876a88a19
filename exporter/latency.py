"""Batch-1 latency of ONNX models in onnxruntime, alone or several side by side."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporter.errors import ExportError


def onnx_latency_ms(
    path: Path, sample: np.ndarray, *, warmup: int = 10, runs: int = 50, threads: int | None = None
) -> dict[str, float]:
    """p50 and p95 latency in milliseconds of one ONNX model on a batch-1 `sample`."""
    return interleaved_latency_ms({"model": path}, sample, warmup=warmup, rounds=runs, threads=threads)["model"]


def interleaved_latency_ms(
    paths: dict[str, Path],
    sample: np.ndarray,
    *,
    warmup: int = 10,
    rounds: int = 50,
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """p50 and p95 latency in milliseconds of several ONNX models, measured side by side.

    Each round runs every model once, in an order that rotates from round to round, so that
    machine noise (other processes, clock changes) hits all models alike and their ratios are fair.
    """
    if not paths:
        raise ExportError("no models given to measure: pass at least one ONNX path")
    if rounds < 1 or warmup < 0:
        raise ExportError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    sample = _batch_one(sample)
    names = list(paths)
    runners = {name: _runner(Path(paths[name]), sample, threads) for name in names}
    for name in names:
        for _ in range(warmup):
            runners[name]()

    timings_ms: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runners[name]()
            timings_ms[name].append((time.perf_counter() - start) * 1000.0)
    return {name: _percentiles(times) for name, times in timings_ms.items()}


def _session_options(threads: int | None) -> ort.SessionOptions:
    """The one place onnxruntime is configured for latency measurements."""
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def _runner(path: Path, sample: np.ndarray, threads: int | None):
    """A no-argument function that runs the model at `path` once on `sample`."""
    try:
        session = ort.InferenceSession(str(path), _session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"cannot load ONNX model {path} for timing: {error}; re-export it") from error
    feeds = {session.get_inputs()[0].name: sample}
    try:
        session.run(None, feeds)
    except Exception as error:
        raise ExportError(
            f"cannot run ONNX model {path} on a sample of shape {list(sample.shape)}: {' '.join(str(error).split())}; "
            "pass a sample shaped like the model's input"
        ) from error
    return lambda: session.run(None, feeds)


def _batch_one(sample: np.ndarray) -> np.ndarray:
    sample = np.ascontiguousarray(sample)
    if sample.dtype.kind == "f":
        sample = sample.astype(np.float32, copy=False)  # token ids (int64) stay as they are
    if sample.ndim == 0 or sample.shape[0] != 1:
        raise ExportError(f"latency sample must have batch 1, got shape {list(sample.shape)}: pass inputs[:1]")
    return sample


def _percentiles(times_ms: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(times_ms, 50)), "p95": float(np.percentile(times_ms, 95))}
