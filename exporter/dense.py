"""The dense parent every method of a portfolio shares: trained once, or loaded from a checkpoint.

Training keeps the weights at IMP's rewind iteration, so DNNShifter can rewind to them whatever
other methods run beside it. With a run directory the trained model is kept and reused by a
later run with the same settings.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from exporter.data import Dataset
from exporter.models import load_checkpoint
from exporter.train import TrainConfig, evaluate, train

DENSE_FILE = "dense.pt"


@dataclass
class Dense:
    model: nn.Module
    accuracy: float
    rewind_state: dict | None   # weights at the rewind iteration; None: rewind to the trained weights
    seconds: float
    reused: str | None = None   # where the weights came from when not trained now


def dense_parent(build: Callable[[], nn.Module], data: Dataset, config: TrainConfig, rewind_iteration: int,
                 checkpoint: Path | None = None, run_dir: Path | None = None, fingerprint: dict | None = None,
                 progress: bool = True) -> Dense:
    model = build()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)  # raises a clear ExportError if it does not fit
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        rewind = saved.get("rewind") if isinstance(saved, dict) and "model" in saved else None
        return Dense(model.eval(), evaluate(model, data.test_x, data.test_y), rewind, 0.0, reused=str(checkpoint))
    wanted = json.loads(json.dumps({**(fingerprint or {}), "train": config.to_dict(), "rewind": rewind_iteration},
                                   default=str))
    cached = _cached(run_dir, wanted)
    if cached is not None:
        model.load_state_dict(cached["model"])
        return Dense(model.eval(), cached["accuracy"], cached["rewind"], 0.0, reused=str(run_dir / DENSE_FILE))
    started = time.perf_counter()
    result = train(model, data, config, rewind_iteration=rewind_iteration, description="dense", progress=progress)
    dense = Dense(model.eval(), result.accuracy, result.rewind_state, time.perf_counter() - started)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        partial = run_dir / (DENSE_FILE + ".partial")
        torch.save({"settings": wanted, "model": model.state_dict(), "accuracy": dense.accuracy,
                    "rewind": dense.rewind_state}, partial)
        partial.replace(run_dir / DENSE_FILE)
    return dense


def _cached(run_dir: Path | None, wanted: dict) -> dict | None:
    path = None if run_dir is None else run_dir / DENSE_FILE
    if path is None or not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved if saved.get("settings") == wanted else None
