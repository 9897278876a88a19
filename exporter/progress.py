"""How a long run shows its progress: tqdm bars on a terminal, plain lines anywhere else, nothing with --quiet.

Off a terminal (`edgeshift-export portfolio | tee log`, CI, nohup) a bar prints nothing useful,
so each epoch becomes one line instead. Lines go to stdout, beside the run's other lines (per
IMP level, per variant, per export), flushed at once so a pipe shows them as they happen;
bars go to stderr, as tqdm's always have.
"""
from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm


def on_terminal() -> bool:
    """Both streams on a terminal: only then does a bar redraw in place rather than litter a log."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def line(text: str) -> None:
    """One progress or log line on stdout, flushed so that a pipe sees it now, not when a buffer fills."""
    print(text, flush=True)


def quiet(text: str) -> None:
    """The log of a run asked to be quiet."""


class EpochProgress:
    """A training run's progress: a bar over its steps on a terminal, else one line per finished epoch."""

    def __init__(self, description: str, epochs: int, steps_per_epoch: int, enabled: bool = True):
        self.description = description
        self.epochs = epochs
        self.bar = tqdm(total=epochs * steps_per_epoch, desc=description, unit="it", leave=False) \
            if enabled and on_terminal() else None
        self.lines = enabled and self.bar is None
        self._epoch_started = time.perf_counter()

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step done; its loss is read (a device sync) only where a bar shows it."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)

    def epoch(self, index: int, loss: float, accuracy: float) -> None:
        """Epoch `index` (from 1) finished with this mean training loss and training accuracy."""
        if self.lines:
            line(f"{self.description} epoch {index}/{self.epochs}: loss {loss:.3f}, train acc {accuracy:.1%}, "
                 f"{time.perf_counter() - self._epoch_started:.1f} s")
        self._epoch_started = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
