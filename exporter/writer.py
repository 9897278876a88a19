"""Writing a classification portfolio: describe each variant, export and check it, publish atomically.

Shared by every method (DNNShifter's IMP path, Reconvene's PaI path): a method builds trained
models, this module turns them into a verified portfolio directory.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from agent.portfolio import Manifest, Preprocessing, TensorSpec, Variant, file_entry, save_samples, write_manifest
from exporter.data import Dataset
from exporter.errors import ExportError
from exporter.export import export_onnx, export_tflite, tflite_input_shape
from exporter.latency import onnx_latency_ms
from exporter.report import write_report
from exporter.train import predict
from exporter.versions import exporter_versions

SAMPLE_COUNT = 8       # health-check inputs in samples.npz


@dataclass
class BuiltVariant:
    variant: Variant
    model: nn.Module


def describe(model: nn.Module, variant_id: str, method: str, parent: str | None, density: float,
             example: torch.Tensor, metrics: dict, details: dict) -> Variant:
    """A manifest entry for a trained model: its size, work and quality; files are added at export."""
    macs, params = tp.utils.count_ops_and_params(model, example)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return Variant(id=variant_id, method=method, parent=parent, density=density, params=int(params),
                   params_nonzero=nonzero, macs=int(macs), metrics=dict(metrics), files={}, details=details)


def export_classification(root: Path, name: str, data: Dataset, built: list[BuiltVariant], tflite: bool,
                          exporter_info: dict[str, str], log) -> Manifest:
    """Export every variant (ONNX, and TFLite unless told not to), each checked against torch; write the manifest."""
    (root / "variants").mkdir()
    check = data.test_x[:16]
    sample = data.test_x[:1].numpy()
    for item in built:
        v = item.variant
        started = time.perf_counter()
        onnx_rel = f"variants/{v.id}.onnx"
        diff = export_onnx(item.model, check, root / onnx_rel)
        v.files["onnx"] = file_entry(root, onnx_rel, diff)
        if tflite:
            tflite_rel = f"variants/{v.id}.tflite"
            diff = export_tflite(item.model, check, root / tflite_rel)
            v.files["tflite"] = file_entry(root, tflite_rel, diff, tflite_input_shape(root / tflite_rel))
        v.host_latency_ms = onnx_latency_ms(root / onnx_rel, sample)
        log(f"exported {v.id}: {v.files['onnx'].bytes / 1024:.0f} KiB onnx, "
            f"p50 {v.host_latency_ms['p50']:.2f} ms ({time.perf_counter() - started:.1f} s)")

    samples = data.test_x[:SAMPLE_COUNT]
    save_samples(root, [samples.numpy()], {b.variant.id: predict(b.model, samples).numpy() for b in built})
    manifest = Manifest(
        name=name, task="classification",
        inputs=[TensorSpec("input", "float32", [-1, *data.input_shape], "NCHW")],
        outputs=[TensorSpec("logits", "float32", [-1, data.num_classes])],
        variants=[b.variant for b in built], default_variant=built[0].variant.id,
        labels=list(data.labels), preprocessing=Preprocessing(**data.preprocessing),
        exporter={**exporter_versions(), **exporter_info},
    )
    write_manifest(root, manifest)
    write_report(root, manifest)
    return manifest


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A fresh directory beside `out` to write into; it replaces `out` only if the block succeeds."""
    _check_output_dir(out, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        yield staging
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_output_dir(out: Path, force: bool) -> None:
    """Fail before any work if `out` cannot be written (call it before hours of training)."""
    _check_output_dir(out, force)


def _check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"output directory {out} is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _publish(staging: Path, out: Path) -> None:
    """Swap the finished portfolio into place; a reader never sees a half-written one."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
