"""A run directory: what a long export keeps so that a killed run resumes where it stopped.

It holds the dense parent, every IMP level, and the state of the training in progress at its last
finished epoch. `run.json` records the settings each part was computed with, per part (dense,
imp), so a later run may add a method but never reuses weights computed under other settings:
those are refused with the first difference named, before anything is trained or written.
Every file is written whole (to a temporary name, then renamed), so a kill leaves either the old
file or the new one; under torchrun only rank 0 writes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from exporter.distributed import is_writer
from exporter.errors import ExportError

SETTINGS_FILE = "run.json"
IN_PROGRESS = "-training"  # suffix of a checkpoint's training in progress


class RunDir:
    def __init__(self, path: Path, settings: dict[str, dict]):
        self.path = path
        self.settings = settings

    @classmethod
    def open(cls, path: Path | None, settings: dict[str, dict]) -> RunDir | None:
        """The run directory at `path` for a run whose parts have these settings; refuses other settings."""
        if path is None:
            return None
        wanted = json.loads(json.dumps(settings, default=str))  # as run.json will read back
        recorded = _read_settings(path)
        for part, values in wanted.items():
            if part in recorded and recorded[part] != values:
                raise ExportError(f"--run-dir {path} holds a run with other {part} settings "
                                  f"({_first_difference(recorded[part], values)}); give a new --run-dir, or "
                                  f"delete that one to start over")
        if path.exists() and not path.is_dir():
            raise ExportError(f"--run-dir {path} is a file, not a directory")
        if not is_writer():
            return cls(path, wanted)
        path.mkdir(parents=True, exist_ok=True)
        _write_atomically(path / SETTINGS_FILE, lambda file: file.write_text(
            json.dumps({**recorded, **wanted}, indent=2, sort_keys=True)))
        return cls(path, wanted)

    def load(self, name: str) -> dict | None:
        """The checkpoint `name` (e.g. "dense", "level_03"), or None when this run has not made it yet."""
        path = self._file(name)
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def save(self, name: str, payload: dict) -> None:
        if is_writer():
            _write_atomically(self._file(name), lambda file: torch.save(payload, file))

    def in_progress(self, name: str) -> tuple[RunDir, str]:
        """Where the training that makes `name` keeps its state at each epoch, for `train(resume=...)`."""
        return self, name + IN_PROGRESS

    def finish(self, name: str, payload: dict) -> None:
        """Keep `name`'s finished result, then drop its training in progress (a kill in between keeps both)."""
        self.save(name, payload)
        if is_writer():
            self._file(name + IN_PROGRESS).unlink(missing_ok=True)

    def holds(self) -> list[str]:
        """The checkpoints on disk, by name, for the line that says what a run reuses."""
        return sorted(file.stem for file in self.path.glob("*.pt"))

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.pt"


def _read_settings(path: Path) -> dict:
    file = path / SETTINGS_FILE
    if not file.is_file():
        return {}
    try:
        recorded = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"--run-dir {path}: {SETTINGS_FILE} is unreadable ({error}); give a new --run-dir") from None
    if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
        raise ExportError(f"--run-dir {path} was written by an older edgeshift; give a new --run-dir")
    return recorded


def _first_difference(recorded: dict, wanted: dict) -> str:
    """A value both runs set differently, if any, else a setting only one of them has."""
    both = sorted(set(recorded) & set(wanted))
    for key in both + sorted((set(recorded) | set(wanted)) - set(both)):
        if recorded.get(key) != wanted.get(key):
            return f"{key}: {recorded.get(key)!r} there, {wanted.get(key)!r} now"
    return "none"


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.replace(path)
