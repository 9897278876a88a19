"""Iterative magnitude pruning with weight rewinding (Frankle et al.; DNNShifter's sparse models).

Level 0 trains the dense model and remembers its weights at the rewind iteration. Each next
level drops a fraction of the surviving weights by global magnitude, rewinds the survivors to
those early weights, and retrains with the mask enforced. Every level is a sparse variant.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from exporter.data import Dataset
from exporter.errors import ExportError
from exporter.models import classifier_of
from exporter.pruning.masks import Masks, full_masks, global_magnitude_prune, prunable_weights, \
    with_batchnorm_of_empty_filters
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
            keep: set[int], run_dir: Path | None = None, fingerprint: dict | None = None,
            pretrained: dict | None = None, progress: bool = True) -> dict[int, Level]:
    """Train levels 0..config.levels; return those in `keep`. With `run_dir`, reuse levels trained before.

    `pretrained` (a checkpoint: {"model": state_dict, optional "rewind": state_dict}) replaces the
    dense training; without its own rewind weights, every level rewinds to the trained ones.
    """
    missing = sorted(k for k in keep if not 0 <= k <= config.levels)
    if missing:
        raise ExportError(f"level {missing[0]} was not trained: this run trains levels 0..{config.levels}; "
                          f"pick levels in that range or raise --imp-levels")
    store = _LevelStore(run_dir, {**(fingerprint or {}), "imp": asdict(config), "train": train_config.to_dict()})
    model = build()
    example = data.train_x[:1]
    weights = prunable_weights(model, classifier_of(model), config.include_classifier)
    level_train = TrainConfig(**{**train_config.to_dict(), "epochs": config.level_epochs or train_config.epochs})

    kept: dict[int, Level] = {}
    dense = store.load(0)
    if dense is None and pretrained is not None:
        model.load_state_dict(pretrained["model"])
        accuracy = evaluate(model, data.test_x, data.test_y)
        dense = store.save(0, Level(0, 1.0, accuracy, _copy(model.state_dict()), full_masks(weights)),
                           pretrained.get("rewind") or _copy(model.state_dict()))
    elif dense is None:
        started = time.perf_counter()
        result = train(model, data, train_config, rewind_iteration=config.rewind_iteration,
                       description="level 0 (dense)", progress=progress)
        rewind = result.rewind_state or _copy(model.state_dict())
        dense = store.save(0, Level(0, 1.0, result.accuracy, _copy(model.state_dict()), full_masks(weights),
                                    time.perf_counter() - started), rewind)
    rewind = store.rewind_state()
    previous = dense
    if 0 in keep:
        kept[0] = dense

    for level in range(1, config.levels + 1):
        current = store.load(level)
        if current is None:
            started = time.perf_counter()
            model.load_state_dict(previous.state)
            masks = global_magnitude_prune(weights, previous.masks, config.fraction)
            masks = with_batchnorm_of_empty_filters(model, masks, example)
            model.load_state_dict(rewind)
            result = train(model, data, level_train, masks=masks, description=f"level {level} "
                           f"(density {masks.density:.3f})", progress=progress)
            current = store.save(level, Level(level, masks.density, result.accuracy, _copy(model.state_dict()), masks,
                                              time.perf_counter() - started))
        if level in keep:
            kept[level] = current
        previous = current
    return kept


def _copy(state: dict) -> dict:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


class _LevelStore:
    """Per-level checkpoints in a run directory, reused only by a run with the same settings."""

    def __init__(self, run_dir: Path | None, fingerprint: dict):
        self.run_dir = run_dir
        self._rewind: dict | None = None
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        settings = run_dir / "run.json"
        wanted = json.loads(json.dumps(fingerprint, default=str))
        if settings.exists() and json.loads(settings.read_text()) != wanted:
            for stale in run_dir.glob("level_*.pt"):
                stale.unlink()  # other settings: those levels answer another question
        settings.write_text(json.dumps(wanted, indent=2))

    def _path(self, level: int) -> Path:
        return self.run_dir / f"level_{level:02d}.pt"

    def load(self, level: int) -> Level | None:
        if self.run_dir is None or not self._path(level).exists():
            return None
        saved = torch.load(self._path(level), map_location="cpu", weights_only=True)
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
            torch.save(payload, self._path(level))
        return result

    def rewind_state(self) -> dict:
        assert self._rewind is not None, "level 0 is loaded or trained first"
        return self._rewind
