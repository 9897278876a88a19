"""int4 and int8 weight-only twins of an LM variant's ONNX file, each measured as a variant of its own.

The twin's perplexity is measured on the same held-out windows as its float parent, by onnxruntime
on the twin itself (its quantized weights exist only in that file). Its recorded max_abs_diff is how
far onnxruntime's int8-activation kernels (accuracy_level 4) stray from float computation with the
same quantized weights (accuracy_level 0) on the samples: a device with other kernels lands between
the two, and the agent allows ten times that.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from agent.kv_cache import cache_inputs, empty_cache
from agent.manifest import KvCache
from agent.portfolio import Variant, file_entry
from exporter.mosaic.onnx_export import log_softmax, step_latency_ms
from exporter.quantize.lm_weights import quantize_weights

WEIGHT_BITS = (4, 8)
DIFF_FLOOR = 1e-5  # kernels that agree exactly on this machine may not on another


@dataclass(frozen=True)
class Twin:
    variant: Variant
    expected: np.ndarray          # the twin's own logits on the samples: what the agent's health check expects


def weight_only_twin(root: Path, parent: Variant, bits: int, layers: list[list[int]], held_out: torch.Tensor,
                     samples: torch.Tensor, context: int) -> Twin:
    """Write variants/<parent>-int<bits>.onnx beside the parent's file and describe it.

    Raises QuantizationUnsupported (the caller keeps the float variant and warns) when it cannot be made.
    """
    started = time.perf_counter()
    variant_id = f"{parent.id}-int{bits}"
    rel = f"variants/{variant_id}.onnx"
    result = quantize_weights(root / parent.files["onnx"].path, root / rel, bits)
    session = _session(root / rel)
    expected = _logits(session, samples.numpy(), layers)
    kernel_diff = _kernel_difference(root / rel, samples.numpy(), layers, expected)
    metrics = {**parent.metrics, "perplexity": _perplexity(session, held_out.numpy(), layers)}
    size_mib = (root / rel).stat().st_size / 2**20
    details = {"weight_bits": bits, "block_size": result.block_size, "symmetric": True,
               "quantized_matmuls": result.quantized, "float_matmuls": result.kept_float,
               "quantized_embedding": result.embedding_quantized, "embedding_shares_head": result.embedding_shares_head,
               "file_mib": round(size_mib, 2), "quantize_s": round(time.perf_counter() - started, 2)}
    variant = Variant(id=variant_id, method=f"{parent.method}+int{bits}", parent=parent.id, density=parent.density,
                      params=parent.params, params_nonzero=parent.params_nonzero, macs=parent.macs, metrics=metrics,
                      files={"onnx": file_entry(root, rel, max(kernel_diff, DIFF_FLOOR))}, details=details)
    variant.files["onnx"].kv_cache = KvCache(layers, parent.files["onnx"].kv_cache.buffer)  # the parent's graph
    variant.host_latency_ms = step_latency_ms(root / rel, variant.files["onnx"].kv_cache, context // 2)
    return Twin(variant, expected)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _logits(session: ort.InferenceSession, ids: np.ndarray, layers: list[list[int]]) -> np.ndarray:
    names = [item.name for item in session.get_inputs()]
    return session.run(None, dict(zip(names, cache_inputs(ids, empty_cache(len(ids), KvCache(layers))))))[0]


def _perplexity(session: ort.InferenceSession, windows: np.ndarray, layers: list[list[int]]) -> float:
    """Like exporter.mosaic.evaluate.perplexity, window by window, on the ONNX file."""
    total, count = 0.0, 0
    for window in windows:
        log_probs = log_softmax(_logits(session, window[None], layers)[0, :-1].astype(np.float64))
        total -= float(log_probs[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return math.exp(total / count)


def _kernel_difference(path: Path, ids: np.ndarray, layers: list[list[int]], expected: np.ndarray) -> float:
    """Max |logits of the int8-activation kernels - logits of float computation on the same weights|."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 0
    with tempfile.TemporaryDirectory(prefix="edgeshift-nbits-") as scratch:
        reference = Path(scratch) / "float-compute.onnx"
        onnx.save(model, str(reference))
        float_compute = _logits(_session(reference), ids, layers)
    return float(np.abs(expected.astype(np.float64) - float_compute).max())
