"""From a model and its data to a verified portfolio: one dense parent, every method's variants, one writer.

The methods asked for (`--method dnnshifter,reconvene`) run one after the other on the same
dense parent; their variants, and the int8 twins of them, go through one export, one latency
measurement and one report. Mosaic (causal LMs) has a pipeline of its own (exporter.mosaic).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.portfolio import Manifest
from exporter.data import load_dataset
from exporter.dense import dense_parent, dense_settings
from exporter.dnnshifter.imp import ImpConfig, imp_settings
from exporter.distributed import is_writer
from exporter.dnnshifter.method import DnnShifter
from exporter.errors import ExportError
from exporter.methods import CLASSIFICATION_METHODS, Context, Method
from exporter.models import build_model
from exporter.reconvene.method import DEFAULT_DENSITIES, Reconvene, reconvene_settings
from exporter.reconvene.reconvene import ReconveneConfig
from exporter.run_dir import RunDir
from exporter.train import TrainConfig, seeded
from exporter.writer import BuiltVariant, WriteOptions, check_output_dir, describe, staged_output, write_portfolio

DEFAULT_METHODS = ("reconvene",)
QUANTIZE_CHOICES = ("int8", "none")


@dataclass
class PortfolioSpec:
    out: Path
    model: str
    width: float = 1.0
    data: str = "digits"
    input_size: int | None = None     # the side an image folder's images are resized to (default 32)
    methods: tuple[str, ...] = DEFAULT_METHODS
    checkpoint: Path | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    imp: ImpConfig = field(default_factory=ImpConfig)
    levels: list[int] | None = None   # IMP levels kept as variants; default: every third, and the last
    run_dir: Path | None = None
    reconvene: ReconveneConfig = field(default_factory=ReconveneConfig)
    densities: tuple[float, ...] = DEFAULT_DENSITIES
    calibration_size: int = 64        # images SNIP and GraSP score on
    pai_unstructured: bool = False    # also Reconvene's unstructured twins (as slow as dense in onnxruntime)
    quantize: str = "int8"
    keep_dominated: bool = False
    tflite: bool = True
    name: str | None = None
    force: bool = False
    progress: bool = True

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in CLASSIFICATION_METHODS]
        if unknown or not self.methods:
            raise ExportError(f"image classifier portfolios are built by {', '.join(CLASSIFICATION_METHODS)}; "
                              f"got {', '.join(self.methods) or 'none'}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ExportError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.imp.fraction is not None and not 0 < self.imp.fraction < 1:
            raise ExportError(f"--prune-fraction must be between 0 and 1, got {self.imp.fraction}")
        if "reconvene" in self.methods:
            self.reconvene.validate()
        if "dnnshifter" in self.methods:
            bad = [level for level in (self.levels or []) if not 0 <= level <= self.imp.levels]
            if bad:
                raise ExportError(f"level {bad[0]} was not trained: this run trains levels 0..{self.imp.levels}; "
                                  f"pick levels in that range or raise --imp-levels")


def build_portfolio(spec: PortfolioSpec, log=print) -> Manifest | None:
    """Train the dense parent, run every method, export and verify; write the portfolio at spec.out.

    Under torchrun every rank trains; only rank 0 goes on to write, the others return None.
    """
    spec.validate()
    train_config = spec.train.resolved()  # an unusable --device fails here, before any work
    check_output_dir(spec.out, spec.force)
    data = load_dataset(spec.data, seed=spec.train.seed, input_size=spec.input_size)
    build = lambda: seeded(spec.train.seed, lambda: build_model(spec.model, data.num_classes, spec.width,
                                                                 data.input_shape[0]))
    fingerprint = {"model": spec.model, "width": spec.width, "data": spec.data,
                   "checkpoint": str(spec.checkpoint) if spec.checkpoint else None}
    if spec.input_size is not None:  # only when given, so run dirs made before the option stay reusable
        fingerprint["input_size"] = spec.input_size
    parts = {"dense": dense_settings(fingerprint, train_config, spec.imp.rewind_iteration)}
    if "dnnshifter" in spec.methods:
        parts["imp"] = imp_settings(fingerprint, train_config, spec.imp)
    if "reconvene" in spec.methods:
        parts["reconvene"] = reconvene_settings(fingerprint, train_config, spec.reconvene, spec.calibration_size)
    run_dir = RunDir.open(spec.run_dir, parts)  # other settings there: refused before any training
    if run_dir is not None and run_dir.holds():
        log(f"run dir {run_dir.path}: reusing {', '.join(run_dir.holds())}")
    dense = dense_parent(build, data, train_config, spec.imp.rewind_iteration, spec.checkpoint, run_dir,
                         spec.progress)
    log(f"dense: accuracy {dense.accuracy:.4f}" + (f", reused from {dense.reused}" if dense.reused
                                                     else f", trained in {dense.seconds:.0f} s"))
    metrics = {"accuracy": dense.accuracy, "dataset": data.name, "n": len(data.test_y)}
    parent = BuiltVariant(describe(dense.model, "dense", "dense", None, 1.0, data.test_x[:1], metrics, {}), dense.model)
    context = Context(data, build, parent, dense.rewind_state, train_config, spec.progress, log)

    built = [parent]
    for method in _methods(spec, run_dir):
        built += list(method.variants(context))

    name = spec.name or f"{spec.model.split(':')[-1]}-{data.name}"
    info = {"method": ",".join(spec.methods), "model": spec.model, "width": str(spec.width),
            "train": json.dumps(train_config.to_dict())}
    if "dnnshifter" in spec.methods:
        info["imp"] = json.dumps(asdict(spec.imp))
    if "reconvene" in spec.methods:
        info["reconvene"] = json.dumps(asdict(spec.reconvene))
    if not is_writer():
        return None  # under torchrun the other ranks only train
    options = WriteOptions(tflite=spec.tflite, quantize=spec.quantize == "int8", keep_dominated=spec.keep_dominated)
    with staged_output(spec.out, spec.force) as staging:
        return write_portfolio(staging, name, data, built, options, info, log)


def _methods(spec: PortfolioSpec, run_dir: RunDir | None) -> list[Method]:
    made = {
        "dnnshifter": lambda: DnnShifter(spec.imp, spec.levels, run_dir),
        "reconvene": lambda: Reconvene(spec.reconvene, tuple(spec.densities), spec.calibration_size,
                                       spec.pai_unstructured, run_dir),
    }
    return [made[name]() for name in spec.methods]
