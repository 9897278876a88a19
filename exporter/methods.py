"""The pruning methods behind one interface: each yields trained variants of the shared dense model.

A portfolio is built by one loop over the methods asked for (`--method dnnshifter,reconvene`):
they share the dense parent, the data, the export, the samples and the report. Mosaic prunes
causal LMs and has its own writer, so it combines with nothing else.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch.nn as nn

from exporter.data import Dataset
from exporter.errors import ExportError
from exporter.train import TrainConfig
from exporter.writer import BuiltVariant

CLASSIFICATION_METHODS = ("dnnshifter", "reconvene")
LM_METHODS = ("mosaic",)
ALIASES = {"pai": "reconvene", "imp": "dnnshifter"}


@dataclass
class Context:
    """What every method of one portfolio shares."""

    data: Dataset
    build: Callable[[], nn.Module]   # the seeded initialization: the same weights on every call
    dense: BuiltVariant              # the trained dense parent, already a variant of the portfolio
    rewind_state: dict | None        # the dense run's weights at IMP's rewind iteration
    train: TrainConfig
    progress: bool
    log: Callable[[str], None]


class Method(Protocol):
    name: str

    def variants(self, context: Context) -> Iterator[BuiltVariant]:
        """Trained variants other than the dense one, each with its manifest entry described."""


def parse_methods(text: str) -> list[str]:
    """'dnnshifter,pai' -> ['dnnshifter', 'reconvene']; a one-line ExportError for anything else."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    known = CLASSIFICATION_METHODS + LM_METHODS
    if not names:
        raise ExportError(f"--method needs at least one of {', '.join(known)}")
    methods = []
    for name in names:
        canonical = ALIASES.get(name, name)
        if canonical not in known:
            raise ExportError(f"unknown method '{name}' in --method {text}; choose from {', '.join(known)} "
                              f"(comma-separated, e.g. dnnshifter,reconvene)")
        if canonical in methods:
            raise ExportError(f"method '{canonical}' is named twice in --method {text}")
        methods.append(canonical)
    if "mosaic" in methods and len(methods) > 1:
        raise ExportError(f"--method {text}: mosaic prunes causal LMs and combines with no other method; "
                          "build it as its own portfolio")
    return methods
