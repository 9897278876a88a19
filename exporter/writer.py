"""Writing a classification portfolio: describe each variant, export and check it, publish atomically.

Shared by every method (DNNShifter, Reconvene, and their combination): the methods build trained
models, this module turns them into a verified portfolio directory, with int8 twins, latencies
measured side by side, and only the variants worth deploying.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from agent.portfolio import Manifest, Preprocessing, TensorSpec, Variant, file_entry, save_evaluation, save_samples, \
    write_manifest
from exporter.data import Dataset
from exporter.errors import ExportError
from exporter.export import export_onnx, export_tflite, tflite_input_shape
from exporter.latency import interleaved_latency_ms
from exporter.quantize import QuantizationUnsupported, Quantized, add_int8_tflite, quantize_variant
from exporter.selection import select_front
from exporter.report import write_report
from exporter.train import predict
from exporter.versions import exporter_versions

SAMPLE_COUNT = 8       # health-check inputs in samples.npz
EVALUATION_COUNT = 500  # labelled held-out inputs in evaluation.npz, for the agent's benchmarks
LATENCY_WARMUP = 10
LATENCY_ROUNDS = 100


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


@dataclass
class WriteOptions:
    tflite: bool = True            # a TFLite file beside each ONNX one
    quantize: bool = True          # an int8 twin of every float variant
    keep_dominated: bool = False   # keep variants off the accuracy/latency front too
    labelled: bool = True          # the data's test labels are real: accuracy and evaluation.npz mean something


@dataclass
class _Entry:
    """A variant on its way into the portfolio: a float one has its torch model, an int8 twin its outputs."""

    variant: Variant
    model: nn.Module | None = None
    quantized: Quantized | None = None


def write_portfolio(root: Path, name: str, data: Dataset, built: list[BuiltVariant], options: WriteOptions,
                    exporter_info: dict[str, str], log) -> Manifest:
    """Export, quantize, time side by side, keep the front, and write the manifest, samples and report."""
    (root / "variants").mkdir()
    check = data.test_x[:16]
    samples = data.test_x[:SAMPLE_COUNT]
    entries = [_Entry(b.variant, b.model) for b in built]
    for entry in entries:
        started = time.perf_counter()
        rel = f"variants/{entry.variant.id}.onnx"
        entry.variant.files["onnx"] = file_entry(root, rel, export_onnx(entry.model, check, root / rel))
        log(f"exported {entry.variant.id}: {entry.variant.files['onnx'].bytes / 1024:.0f} KiB onnx "
            f"({time.perf_counter() - started:.1f} s)")
    if options.quantize:
        entries += _int8_twins(root, entries, data, samples, log)
    entries = _distinct(root, entries, log)
    _measure_side_by_side(root, entries, data.test_x[:1].numpy(), log)
    if not options.keep_dominated:
        entries = _front(root, entries, log)
    if options.tflite:
        for entry in entries:
            _add_tflite(root, entry, check, log)

    kept = [e.variant for e in entries]
    save_samples(root, [samples.numpy()], {e.variant.id: _expected(e, samples) for e in entries})
    manifest = Manifest(
        name=name, task="classification",
        inputs=[TensorSpec("input", "float32", [-1, *data.input_shape], "NCHW")],
        outputs=[TensorSpec("logits", "float32", [-1, data.num_classes])],
        variants=kept, default_variant=kept[0].id,
        labels=list(data.labels), preprocessing=Preprocessing(**data.preprocessing),
        exporter={**exporter_versions(), **exporter_info},
        evaluation=save_evaluation(root, data.test_x[:EVALUATION_COUNT].numpy(), data.test_y[:EVALUATION_COUNT].numpy())
        if options.labelled else None,
    )
    write_manifest(root, manifest)
    write_report(root, manifest)
    return manifest


def _int8_twins(root: Path, entries: list[_Entry], data: Dataset, samples: torch.Tensor, log) -> list[_Entry]:
    twins = []
    for entry in entries:
        started = time.perf_counter()
        try:
            quantized = quantize_variant(root, entry.variant, entry.model, data, samples, tflite=False)
        except QuantizationUnsupported as reason:
            log(f"warning: no int8 twin of {entry.variant.id}, keeping the float variant only: {reason}")
            continue
        twins.append(_Entry(quantized.variant, quantized=quantized))
        log(f"quantized {entry.variant.id} to int8: accuracy {quantized.variant.metrics['accuracy']:.4f} "
            f"(float {entry.variant.metrics['accuracy']:.4f}) in {time.perf_counter() - started:.1f} s")
    return twins


def _distinct(root: Path, entries: list[_Entry], log) -> list[_Entry]:
    """No two variants with the same model bytes: a later copy is the same model under another name."""
    seen: dict[str, str] = {}
    kept = []
    for entry in entries:
        digest = entry.variant.files["onnx"].sha256
        if digest in seen:
            log(f"{entry.variant.id} is byte-identical to {seen[digest]}; keeping {seen[digest]} only")
            _remove_files(root, entry.variant)
            continue
        seen[digest] = entry.variant.id
        kept.append(entry)
    return kept


def _measure_side_by_side(root: Path, entries: list[_Entry], sample: np.ndarray, log) -> None:
    """Batch-1 latency of every variant on one thread, interleaved, so that their ratios are fair."""
    paths = {e.variant.id: root / e.variant.files["onnx"].path for e in entries}
    started = time.perf_counter()
    measured = interleaved_latency_ms(paths, sample, warmup=LATENCY_WARMUP, rounds=LATENCY_ROUNDS, threads=1)
    for entry in entries:
        entry.variant.host_latency_ms = measured[entry.variant.id]
    log(f"timed {len(entries)} variants side by side ({LATENCY_ROUNDS} rounds, 1 thread) in "
        f"{time.perf_counter() - started:.1f} s")


def _front(root: Path, entries: list[_Entry], log) -> list[_Entry]:
    selection = select_front([e.variant for e in entries], always={entries[0].variant.id})
    by_id = {e.variant.id: e.variant for e in entries}
    for dropped, better in selection.dropped.items():
        log(f"dropped {dropped} ({_cost(by_id[dropped])}): {better} ({_cost(by_id[better])}) beats it "
            f"on accuracy and latency")
    kept_ids = {v.id for v in selection.kept}
    for entry in entries:
        if entry.variant.id not in kept_ids:
            _remove_files(root, entry.variant)
    return [e for e in entries if e.variant.id in kept_ids]


def _cost(variant: Variant) -> str:
    return f"accuracy {variant.metrics['accuracy']:.1%}, p50 {variant.host_latency_ms['p50']:.2f} ms"


def _add_tflite(root: Path, entry: _Entry, check: torch.Tensor, log) -> None:
    v = entry.variant
    rel = f"variants/{v.id}.tflite"
    if entry.model is None:
        add_int8_tflite(root, entry.quantized, rel, check, log)  # on failure: warned, the twin serves from ONNX
    else:
        diff = export_tflite(entry.model, check, root / rel)
        v.files["tflite"] = file_entry(root, rel, diff, tflite_input_shape(root / rel))


def _expected(entry: _Entry, samples: torch.Tensor) -> np.ndarray:
    return entry.quantized.expected if entry.model is None else predict(entry.model, samples).detach().numpy()


def _remove_files(root: Path, variant: Variant) -> None:
    for entry in variant.files.values():
        (root / entry.path).unlink(missing_ok=True)


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
