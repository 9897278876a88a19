"""Unstructured pruning-at-initialization scorers behind one interface.

A scorer turns a freshly initialized model into global masks at a requested density. One-shot
scorers (SNIP, GraSP, magnitude, random) rank weights once by `scores`; SynFlow prunes in rounds.
Every scorer ranks with `keep_top_scores`, the global ranking IMP's magnitude criterion uses.
"""
from __future__ import annotations

from exporter.errors import ExportError
from exporter.reconvene.scorers.base import Batch, Scored, Scorer
from exporter.reconvene.scorers.grasp import GraSP
from exporter.reconvene.scorers.magnitude import Magnitude
from exporter.reconvene.scorers.random import Random
from exporter.reconvene.scorers.snip import SNIP
from exporter.reconvene.scorers.synflow import SynFlow

SCORERS: dict[str, type[Scorer]] = {s.name: s for s in (SNIP, GraSP, SynFlow, Magnitude, Random)}
DEFAULT_SCORER = "synflow"

__all__ = ["SCORERS", "DEFAULT_SCORER", "Batch", "Scored", "Scorer", "get_scorer"]


def get_scorer(name: str, **options) -> Scorer:
    try:
        return SCORERS[name](**options)
    except KeyError:
        raise ExportError(f"unknown scorer '{name}'; choose one of: {', '.join(SCORERS)}") from None
