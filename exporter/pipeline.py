"""From a model and its data to a verified portfolio directory (DNNShifter: IMP, then the structured step)."""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from agent.portfolio import Manifest, Preprocessing, TensorSpec, Variant, file_entry, save_samples, write_manifest
from exporter.data import Dataset, load_dataset
from exporter.errors import ExportError
from exporter.export import export_onnx, export_tflite, tflite_input_shape
from exporter.latency import onnx_latency_ms
from exporter.models import build_model, classifier_of, load_checkpoint
from exporter.pruning.imp import ImpConfig, Level, run_imp
from exporter.pruning.structured import remove_dead_channels
from exporter.report import write_report
from exporter.train import TrainConfig, predict, seeded
from exporter.versions import exporter_versions

EXACT_ATOL = 1e-4      # structured vs sparse parent, max abs difference on logits
SAMPLE_COUNT = 8       # health-check inputs in samples.npz


@dataclass
class PortfolioSpec:
    out: Path
    model: str
    width: float = 1.0
    data: str = "digits"
    checkpoint: Path | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    imp: ImpConfig = field(default_factory=ImpConfig)
    levels: list[int] | None = None   # levels kept as variants; default: every third, and the last
    tflite: bool = True
    run_dir: Path | None = None
    name: str | None = None
    force: bool = False
    progress: bool = True

    def kept_levels(self) -> list[int]:
        if self.levels is not None:
            return sorted(set(self.levels))
        return sorted(set(range(0, self.imp.levels + 1, 3)) | {self.imp.levels})


@dataclass
class BuiltVariant:
    variant: Variant
    model: nn.Module


def build_portfolio(spec: PortfolioSpec, log=print) -> Manifest:
    """Train (or load), prune, shrink, export and verify; write the portfolio at spec.out."""
    _check_output_dir(spec.out, spec.force)
    data = load_dataset(spec.data, seed=spec.train.seed)
    build = lambda: seeded(spec.train.seed, lambda: build_model(spec.model, data.num_classes, spec.width,
                                                                 data.input_shape[0]))
    pretrained = _load_pretrained(build, spec.checkpoint)
    fingerprint = {"model": spec.model, "width": spec.width, "data": spec.data,
                   "checkpoint": str(spec.checkpoint) if spec.checkpoint else None}

    started = time.perf_counter()
    levels = run_imp(build, data, spec.train, spec.imp, set(spec.kept_levels()), spec.run_dir, fingerprint,
                     pretrained=pretrained, progress=spec.progress)
    log(f"IMP: {len(levels)} levels kept in {time.perf_counter() - started:.1f} s")

    name = spec.name or f"{spec.model.split(':')[-1]}-{data.name}"
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.out.name}.", dir=spec.out.parent))
    staging.chmod(0o755)
    try:
        built = _variants(build, levels, data, log)
        manifest = _export_all(staging, name, data, built, spec, log)
        _publish(staging, spec.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _variants(build, levels: dict[int, Level], data: Dataset, log) -> list[BuiltVariant]:
    """The dense model, each kept sparse level, and each level's structured (physically smaller) twin."""
    example = data.test_x[:1]
    probe = torch.randn(64, *data.input_shape, generator=torch.Generator().manual_seed(1))
    variants = []
    for level in sorted(levels):
        sparse = build()
        sparse.load_state_dict(levels[level].state)
        sparse.eval()
        common = {"metrics": {"accuracy": levels[level].accuracy, "dataset": data.name, "n": len(data.test_y)}}
        if level == 0:
            variants.append(BuiltVariant(_describe(sparse, "dense", "dense", None, 1.0, example, common, {}), sparse))
            continue
        sparse_id = f"imp-l{level:02d}-sparse"
        details = {"imp_level": level}
        variants.append(BuiltVariant(_describe(sparse, sparse_id, "imp-sparse", "dense", levels[level].density,
                                               example, common, details), sparse))
        structured = copy.deepcopy(sparse)  # the step works in place; the sparse parent is a variant too
        result = remove_dead_channels(structured, example, keep_outputs_of=classifier_of(structured))
        diff = max(_max_diff(sparse, result.model, probe), _max_diff(sparse, result.model, data.test_x))
        if diff > EXACT_ATOL:
            raise ExportError(f"structured step of level {level} changed the outputs by {diff:.2e} "
                              f"(limit {EXACT_ATOL}); this is a bug, please report it with the model name")
        structured_details = {**details, "structured_ms": round(result.seconds * 1000, 1),
                              "max_abs_diff_vs_parent": diff, "channels_removed": result.removed}
        variants.append(BuiltVariant(_describe(result.model, f"imp-l{level:02d}-structured", "imp-structured",
                                               sparse_id, levels[level].density, example, common,
                                               structured_details), result.model))
        log(f"level {level}: density {levels[level].density:.3f}, accuracy {levels[level].accuracy:.3f}, "
            f"structured step {result.seconds * 1000:.0f} ms, exact to {diff:.1e}")
    return variants


def _describe(model: nn.Module, variant_id: str, method: str, parent: str | None, density: float,
              example: torch.Tensor, common: dict, details: dict) -> Variant:
    macs, params = tp.utils.count_ops_and_params(model, example)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return Variant(id=variant_id, method=method, parent=parent, density=density, params=int(params),
                   params_nonzero=nonzero, macs=int(macs), metrics=dict(common["metrics"]), files={},
                   details=details)


def _export_all(root: Path, name: str, data: Dataset, built: list[BuiltVariant], spec: PortfolioSpec,
                log) -> Manifest:
    (root / "variants").mkdir()
    check = data.test_x[:16]
    sample = data.test_x[:1].numpy()
    for item in built:
        v = item.variant
        started = time.perf_counter()
        onnx_rel = f"variants/{v.id}.onnx"
        diff = export_onnx(item.model, check, root / onnx_rel)
        v.files["onnx"] = file_entry(root, onnx_rel, diff)
        if spec.tflite:
            tflite_rel = f"variants/{v.id}.tflite"
            diff = export_tflite(item.model, check, root / tflite_rel)
            v.files["tflite"] = file_entry(root, tflite_rel, diff, tflite_input_shape(root / tflite_rel))
        v.host_latency_ms = onnx_latency_ms(root / onnx_rel, sample)
        log(f"exported {v.id}: {v.files['onnx'].bytes / 1024:.0f} KiB onnx, "
            f"p50 {v.host_latency_ms['p50']:.2f} ms ({time.perf_counter() - started:.1f} s)")

    samples = data.test_x[:SAMPLE_COUNT]
    save_samples(root, [samples.numpy()], {b.variant.id: predict(b.model, samples).numpy() for b in built})
    shape = [-1, *data.input_shape]
    manifest = Manifest(
        name=name, task="classification",
        inputs=[TensorSpec("input", "float32", shape, "NCHW")],
        outputs=[TensorSpec("logits", "float32", [-1, data.num_classes])],
        variants=[b.variant for b in built], default_variant=built[0].variant.id,
        labels=list(data.labels), preprocessing=Preprocessing(**data.preprocessing),
        exporter={**exporter_versions(), "method": "dnnshifter", "model": spec.model, "width": str(spec.width),
                  "train": json.dumps(spec.train.to_dict()), "imp": json.dumps(asdict(spec.imp))},
    )
    write_manifest(root, manifest)
    write_report(root, manifest)
    return manifest


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((predict(a, x) - predict(b, x)).abs().max())


def _load_pretrained(build, checkpoint: Path | None) -> dict | None:
    if checkpoint is None:
        return None
    model = build()
    load_checkpoint(model, checkpoint)  # raises a clear ExportError if it does not fit
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    rewind = saved.get("rewind") if isinstance(saved, dict) and "model" in saved else None
    return {"model": model.state_dict(), "rewind": rewind}


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
