"""The dense parent every method of a portfolio shares: trained once, or loaded from a checkpoint.

Training keeps the weights at IMP's rewind iteration, so DNNShifter can rewind to them whatever
other methods run beside it. With a run directory the trained model is kept and reused by a
later run with the same settings, and a killed training resumes after its last finished epoch.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from exporter.data import Dataset
from exporter.device import placed_on, resolve_device
from exporter.models import load_checkpoint
from exporter.run_dir import RunDir
from exporter.train import TrainConfig, evaluate, train

DENSE = "dense"  # its checkpoint in a run directory


@dataclass
class Dense:
    model: nn.Module
    accuracy: float
    rewind_state: dict | None   # weights at the rewind iteration; None: rewind to the trained weights
    seconds: float
    reused: str | None = None   # where the weights came from when not trained now


def dense_parent(build: Callable[[], nn.Module], data: Dataset, config: TrainConfig, rewind_iteration: int,
                 checkpoint: Path | None = None, run_dir: RunDir | None = None, progress: bool = True) -> Dense:
    model = build()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)  # raises a clear ExportError if it does not fit
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        rewind = saved.get("rewind") if isinstance(saved, dict) and "model" in saved else None
        with placed_on(model, resolve_device(config.device)):
            accuracy = evaluate(model, data.test_x, data.test_y)
        return Dense(model.eval(), accuracy, rewind, 0.0, reused=str(checkpoint))
    cached = run_dir.load(DENSE) if run_dir is not None else None
    if cached is not None:
        model.load_state_dict(cached["model"])
        return Dense(model.eval(), cached["accuracy"], cached["rewind"], 0.0, reused=str(run_dir.path / f"{DENSE}.pt"))
    started = time.perf_counter()
    result = train(model, data, config, rewind_iteration=rewind_iteration, description="dense", progress=progress,
                   resume=run_dir.in_progress(DENSE) if run_dir is not None else None)
    dense = Dense(model.eval(), result.accuracy, result.rewind_state, time.perf_counter() - started)
    if run_dir is not None:
        run_dir.finish(DENSE, {"model": model.state_dict(), "accuracy": dense.accuracy, "rewind": dense.rewind_state})
    return dense


def dense_settings(fingerprint: dict, config: TrainConfig, rewind_iteration: int) -> dict:
    """What decides the dense parent's weights: the run directory's key for it."""
    return {**fingerprint, "train": config.settings(), "rewind": rewind_iteration}
