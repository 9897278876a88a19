"""Iterative magnitude pruning with weight rewinding (Frankle et al.; DNNShifter's sparse models).

Level 0 trains the dense model and remembers its weights at the rewind iteration. Each next
level drops a fraction of the surviving weights by global magnitude, rewinds the survivors to
those early weights, and retrains with the mask enforced. Every level is a sparse variant.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch.nn as nn

from exporter.data import Dataset
from exporter.device import placed_on, resolve_device
from exporter.errors import ExportError
from exporter.models import classifier_of
from exporter.pruning.masks import Masks, full_masks, global_magnitude_prune, prunable_weights, \
    with_batchnorm_of_empty_filters
from exporter.run_dir import RunDir
from exporter.train import TrainConfig, evaluate, train


@dataclass
class ImpConfig:
    levels: int = 9                 # levels trained after the dense one
    fraction: float = 0.2           # of the surviving weights, pruned per level
    rewind_iteration: int = 50      # the weights every level rewinds to
    include_classifier: bool = False
    level_epochs: int | None = 3     # retraining epochs per level; None: as many as the dense run


@dataclass
class Level:
    level: int
    density: float
    accuracy: float
    state: dict          # trained weights, masked
    masks: Masks
    train_seconds: float = 0.0  # pruning + retraining wall time of this level


def run_imp(build: Callable[[], nn.Module], data: Dataset, train_config: TrainConfig, config: ImpConfig,
            keep: set[int], run_dir: RunDir | None = None, pretrained: dict | None = None, progress: bool = True,
            log: Callable[[str], None] = lambda line: None) -> dict[int, Level]:
    """Train levels 0..config.levels; return those in `keep`. With `run_dir`, reuse levels trained before
    (opened with `imp_settings`), and resume a level's training after its last finished epoch.

    `pretrained` (a checkpoint: {"model": state_dict, optional "rewind": state_dict}) replaces the
    dense training; without its own rewind weights, every level rewinds to the trained ones.
    `log` gets one line per level trained now or reused.
    """
    missing = sorted(k for k in keep if not 0 <= k <= config.levels)
    if missing:
        raise ExportError(f"level {missing[0]} was not trained: this run trains levels 0..{config.levels}; "
                          f"pick levels in that range or raise --imp-levels")
    store = _LevelStore(run_dir)
    model = build()
    example = data.train_x[:1]
    weights = prunable_weights(model, classifier_of(model), config.include_classifier)
    level_train = TrainConfig(**{**train_config.to_dict(), "epochs": config.level_epochs or train_config.epochs})

    kept: dict[int, Level] = {}
    dense = store.load(0)
    if dense is None and pretrained is not None:
        model.load_state_dict(pretrained["model"])
        with placed_on(model, resolve_device(train_config.device)):
            accuracy = evaluate(model, data.test_x, data.test_y)
        dense = store.save(0, Level(0, 1.0, accuracy, _copy(model.state_dict()), full_masks(weights)),
                           pretrained.get("rewind") or _copy(model.state_dict()))
    elif dense is None:
        started = time.perf_counter()
        result = train(model, data, train_config, rewind_iteration=config.rewind_iteration,
                       description="level 0 (dense)", progress=progress, resume=store.training(0))
        rewind = result.rewind_state or _copy(model.state_dict())
        dense = store.save(0, Level(0, 1.0, result.accuracy, _copy(model.state_dict()), full_masks(weights),
                                    time.perf_counter() - started), rewind)
        log(f"IMP level 0/{config.levels}: dense, accuracy {dense.accuracy:.4f}, {dense.train_seconds:.1f} s")
    rewind = store.rewind_state()
    previous = dense
    if 0 in keep:
        kept[0] = dense

    for level in range(1, config.levels + 1):
        current = store.load(level)
        if current is not None:
            log(f"IMP level {level}/{config.levels}: reused from {run_dir.path}, density {current.density:.3f}, "
                f"accuracy {current.accuracy:.4f}")
        else:
            started = time.perf_counter()
            model.load_state_dict(previous.state)
            masks = global_magnitude_prune(weights, previous.masks, config.fraction)
            masks = with_batchnorm_of_empty_filters(model, masks, example)
            model.load_state_dict(rewind)
            result = train(model, data, level_train, masks=masks, description=f"level {level} "
                           f"(density {masks.density:.3f})", progress=progress, resume=store.training(level))
            current = store.save(level, Level(level, masks.density, result.accuracy, _copy(model.state_dict()), masks,
                                              time.perf_counter() - started))
            log(f"IMP level {level}/{config.levels}: density {current.density:.3f}, accuracy {current.accuracy:.4f}, "
                f"{current.train_seconds:.1f} s")
        if level in keep:
            kept[level] = current
        previous = current
    return kept


def imp_settings(fingerprint: dict, train_config: TrainConfig, config: ImpConfig) -> dict:
    """What decides every level's weights, the run directory's key for them: not how many levels are trained."""
    settings = {name: value for name, value in asdict(config).items() if name != "levels"}
    return {**fingerprint, "imp": settings, "train": train_config.settings()}


def _copy(state: dict) -> dict:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


class _LevelStore:
    """Per-level checkpoints in a run directory (or none), and the weights every level rewinds to."""

    def __init__(self, run_dir: RunDir | None):
        self.run_dir = run_dir
        self._rewind: dict | None = None

    def training(self, level: int) -> tuple[RunDir, str] | None:
        """Where the level's training in progress is kept, for `train(resume=...)`."""
        return None if self.run_dir is None else self.run_dir.in_progress(_name(level))

    def load(self, level: int) -> Level | None:
        saved = self.run_dir.load(_name(level)) if self.run_dir is not None else None
        if saved is None:
            return None
        if level == 0:
            self._rewind = saved["rewind"]
        return Level(level, saved["density"], saved["accuracy"], saved["model"], Masks.from_state_dict(saved["masks"]),
                     saved.get("train_seconds", 0.0))

    def save(self, level: int, result: Level, rewind: dict | None = None) -> Level:
        if rewind is not None:
            self._rewind = rewind
        if self.run_dir is not None:
            payload = {"model": result.state, "masks": result.masks.state_dict(), "density": result.density,
                       "accuracy": result.accuracy, "train_seconds": result.train_seconds}
            if level == 0:
                payload["rewind"] = self._rewind
            self.run_dir.finish(_name(level), payload)
        return result

    def rewind_state(self) -> dict:
        assert self._rewind is not None, "level 0 is loaded or trained first"
        return self._rewind


def _name(level: int) -> str:
    return f"level_{level:02d}"
